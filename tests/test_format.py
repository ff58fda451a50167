"""The dashq-packed-linear format: packing round-trips, an independent decoder written from
the format's text, metadata validation."""

import math

import pytest
import torch

from dashq_vllm import format as F


def reference_decode(words: list[int], nbits: int, numel: int) -> list[int]:
    """Decoder written from the spec text: 32//nbits values per 32-bit word, LSB first."""
    per_word = 32 // nbits
    out = []
    for w in words:
        u = w & 0xFFFFFFFF  # the int32 word as unsigned bits
        for j in range(per_word):
            out.append((u >> (nbits * j)) & ((1 << nbits) - 1))
    return out[:numel]


@pytest.mark.parametrize("nbits", [2, 3, 4, 8])
@pytest.mark.parametrize("rows,cols", [(3, 37), (5, 64), (1, 10), (7, 96)])
def test_pack_roundtrip_and_independent_decoder(nbits, rows, cols):
    g = torch.Generator().manual_seed(nbits * 1000 + rows * cols)
    codes = torch.randint(0, 1 << nbits, (rows, cols), generator=g)
    codes[-1, -1] = (1 << nbits) - 1  # the top code, sets high bits of the last word
    packed = F.pack_codes(codes, nbits)
    assert packed.dtype == torch.int32 and packed.dim() == 1
    assert packed.numel() == math.ceil(rows * cols / (32 // nbits))
    assert torch.equal(F.unpack_codes(packed, nbits, rows * cols).long(), codes.reshape(-1))
    assert reference_decode(packed.tolist(), nbits, rows * cols) == codes.reshape(-1).tolist()


def test_sign_bit_and_unused_bits_at_3_bits():
    codes = torch.full((10,), 7)
    (word,) = F.pack_codes(codes, 3).tolist()
    assert word == (1 << 30) - 1  # 30 bits set, the top 2 unused
    codes = torch.full((8,), 15)
    (word,) = F.pack_codes(codes, 4).tolist()
    assert word == -1  # all 32 bits set reads back as int32 -1


def test_pack_rejects_out_of_range():
    with pytest.raises(F.FormatError):
        F.pack_codes(torch.tensor([4]), 2)


def test_unpack_rejects_wrong_length():
    with pytest.raises(F.FormatError, match="words"):
        F.unpack_codes(torch.zeros(3, dtype=torch.int32), 4, 8)


@pytest.mark.parametrize("in_features,group", [(96, 32), (100, 32), (576, 128)])
def test_dequantize_matches_float64_formula(in_features, group):
    spec = F.ModuleSpec.create(in_features, 6, 3, group)
    g = torch.Generator().manual_seed(in_features)
    codes = torch.randint(0, 8, (6, spec.quant_in_features), generator=g)
    scale = torch.rand(6, spec.groups_per_row, generator=g) + 0.1
    zero = torch.rand(6, spec.groups_per_row, generator=g) * 7
    t = F.encode_linear(codes, scale, zero, spec)
    for k, (shape, dtype) in spec.expected_shapes().items():
        assert tuple(t[k].shape) == shape and t[k].dtype == dtype
    w = F.dequantize(t["W_q_packed"], t["scale"], t["zero"], spec, torch.float64)
    s64 = t["scale"].double().view(6, -1).repeat_interleave(group, 1)
    z64 = t["zero"].double().view(6, -1).repeat_interleave(group, 1)
    ref = ((codes.double() - z64) * s64)[:, :in_features]
    assert w.shape == (6, in_features)
    torch.testing.assert_close(w, ref, rtol=1e-6, atol=1e-6)


def _meta(**kw):
    base = F.ModuleSpec.create(128, 16, 2, 32).to_dict()
    base.update(kw)
    return base


@pytest.mark.parametrize("change,msg", [
    ({"nbits": 5}, "nbits"),
    ({"num_groups": 3}, "num_groups"),
    ({"quant_in_features": 100}, "quant_in_features"),
    ({"packing": "int4_packed_u32"}, "packing"),
    ({"scale_zero_dtype": "int8"}, "dtype"),
    ({"out_features": "x"}, "malformed"),
])
def test_module_metadata_rejected(change, msg):
    with pytest.raises(F.FormatError, match=msg):
        F.ModuleSpec.from_dict("layer", _meta(**change))


def test_config_roundtrip_and_errors():
    spec = F.ModuleSpec.create(576, 64, 2, 128)
    cfg = F.DashQConfig({"a.q_proj": spec}, base_model="m")
    d = cfg.to_dict()
    assert d["format"] == "dashq-packed-linear" and d["quantized_modules"]["a.q_proj"]["quant_in_features"] == 640
    back = F.DashQConfig.from_dict(d)
    assert back.modules == cfg.modules
    assert F.quantization_config_entry(back)["bits"] == 2
    with pytest.raises(F.FormatError, match="unknown format"):
        F.DashQConfig.from_dict({**d, "format": "gptq"})
    with pytest.raises(F.FormatError, match="format_version"):
        F.DashQConfig.from_dict({**d, "format_version": 2})
    with pytest.raises(F.FormatError, match="quantized_modules"):
        F.DashQConfig.from_dict({**d, "quantized_modules": {}})


def test_author_style_metadata_without_optional_fields():
    meta = {"in_features": 64, "out_features": 8, "nbits": 2, "group_size": 32, "num_groups": 16}
    spec = F.ModuleSpec.from_dict("x", meta)
    assert spec.quant_in_features == 64 and spec.scale_zero_dtype == "float16"
