"""The "dashq-packed-linear" checkpoint format and its bit packing.

This module is the single owner of the on-disk format. The quantizer writes with it, the
transformers reference loader and the vLLM method read with it, and the kernels' repack
starts from the flat stream it defines. It imports neither vLLM nor Triton.

Format (compatible with the DASH-Q author's checkpoints):

* ``dashq_config.json``::

      {"format": "dashq-packed-linear", "format_version": 1, "base_model": ..., "model_class":
       "causal_lm", "method": "dashq", "quantized_modules": {name: ModuleSpec fields}}

* per quantized linear ``name``:

  - ``name.W_q_packed``: int32, 1-D. The (out_features, quant_in_features) integer codes,
    flattened row-major into one stream, ``32 // nbits`` codes per 32-bit word,
    least-significant bits first (16/10/8/4 codes per word at 2/3/4/8 bits; at 3 bits the top
    2 bits of every word are unused). The last word is zero-padded. Rows may straddle words.
  - ``name.scale`` / ``name.zero``: shape (num_groups, 1), float16 by default. Group g is codes
    ``[g*group_size, (g+1)*group_size)`` of the stream, i.e. groups never cross rows because
    quant_in_features is a multiple of group_size.
  - optional ``name.bias``.

  Dequantization: ``W = (q - zero) * scale``; zero is a float in the code domain. Columns
  ``in_features .. quant_in_features`` (padding, when in_features is not a multiple of the
  group size) are dropped after dequantization.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

FORMAT = "dashq-packed-linear"
FORMAT_VERSION = 1
CONFIG_FILENAME = "dashq_config.json"
SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128)
TENSOR_SUFFIXES = ("W_q_packed", "scale", "zero")

_DTYPES = {
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}


class FormatError(ValueError):
    """A checkpoint or tensor does not follow the dashq-packed-linear format."""


def dtype_from_name(name: str | None, default: torch.dtype) -> torch.dtype:
    if name is None:
        return default
    key = str(name).replace("torch.", "").lower()
    if key not in _DTYPES:
        raise FormatError(f"unknown dtype {name!r}; expected one of float16, bfloat16, float32")
    return _DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# --------------------------------------------------------------------------- bit packing


def values_per_word(nbits: int) -> int:
    if nbits not in SUPPORTED_BITS:
        raise FormatError(f"nbits={nbits} is not supported; choose one of {SUPPORTED_BITS}")
    return 32 // nbits


def packed_length(numel: int, nbits: int) -> int:
    """Number of int32 words holding ``numel`` codes."""
    return math.ceil(numel / values_per_word(nbits))


def pack_codes(codes: torch.Tensor, nbits: int) -> torch.Tensor:
    """Pack integer codes (any shape, row-major order) into the flat int32 stream."""
    vpw = values_per_word(nbits)
    flat = codes.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= (1 << nbits)):
        raise FormatError(f"codes out of range for {nbits}-bit packing")
    pad = (-flat.numel()) % vpw
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    shifts = torch.arange(vpw, dtype=torch.int64, device=flat.device) * nbits
    words = (flat.view(-1, vpw) << shifts).sum(dim=1)
    # Reinterpret as signed 32-bit two's complement (bit 31 set -> negative int32).
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def unpack_codes(packed: torch.Tensor, nbits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: the first ``numel`` codes as a 1-D uint8 tensor."""
    vpw = values_per_word(nbits)
    if packed.dtype != torch.int32 or packed.dim() != 1:
        raise FormatError(f"packed codes must be a 1-D int32 tensor, got {packed.dtype} {tuple(packed.shape)}")
    if packed.numel() != packed_length(numel, nbits):
        raise FormatError(
            f"packed stream has {packed.numel()} words, expected {packed_length(numel, nbits)} "
            f"for {numel} codes at {nbits} bits"
        )
    shifts = torch.arange(vpw, dtype=torch.int32, device=packed.device) * nbits
    mask = (1 << nbits) - 1
    vals = (packed.unsqueeze(1) >> shifts) & mask  # arithmetic shift is fine: mask drops sign bits
    return vals.reshape(-1)[:numel].to(torch.uint8)


# --------------------------------------------------------------------------- module metadata


@dataclass(frozen=True)
class ModuleSpec:
    """Metadata of one quantized linear, as stored in ``quantized_modules``."""

    in_features: int
    out_features: int
    quant_in_features: int
    nbits: int
    group_size: int
    num_groups: int
    linear_dtype: str = "bfloat16"
    scale_zero_dtype: str = "float16"

    @classmethod
    def create(cls, in_features: int, out_features: int, nbits: int, group_size: int,
               linear_dtype: str = "bfloat16", scale_zero_dtype: str = "float16") -> "ModuleSpec":
        check_bits_group(nbits, group_size)
        quant_in = math.ceil(in_features / group_size) * group_size
        return cls(in_features, out_features, quant_in, nbits, group_size,
                   out_features * quant_in // group_size, linear_dtype, scale_zero_dtype)

    @classmethod
    def from_dict(cls, name: str, meta: dict[str, Any]) -> "ModuleSpec":
        if not isinstance(meta, dict):
            raise FormatError(f"{name}: module metadata must be an object")
        missing = [k for k in ("in_features", "out_features", "nbits", "group_size", "num_groups") if k not in meta]
        if missing:
            raise FormatError(f"{name}: metadata lacks {', '.join(missing)}")
        try:
            spec = cls(
                in_features=int(meta["in_features"]),
                out_features=int(meta["out_features"]),
                quant_in_features=int(meta.get("quant_in_features", meta["in_features"])),
                nbits=int(meta["nbits"]),
                group_size=int(meta["group_size"]),
                num_groups=int(meta["num_groups"]),
                linear_dtype=str(meta.get("linear_dtype", "bfloat16")).replace("torch.", ""),
                scale_zero_dtype=str(meta.get("scale_zero_dtype", "float16")).replace("torch.", ""),
            )
        except (TypeError, ValueError) as e:
            raise FormatError(f"{name}: malformed metadata ({e})") from None
        spec.validate(name)
        packing = meta.get("packing")
        if packing is not None and packing != spec.packing:
            raise FormatError(f"{name}: packing {packing!r} does not match nbits={spec.nbits} ({spec.packing!r})")
        return spec

    def validate(self, name: str = "module") -> None:
        if self.nbits not in SUPPORTED_BITS:
            raise FormatError(f"{name}: nbits={self.nbits} is not supported ({SUPPORTED_BITS})")
        if self.group_size <= 0 or self.group_size % 8:
            raise FormatError(f"{name}: group_size={self.group_size} must be a positive multiple of 8")
        if min(self.in_features, self.out_features) <= 0:
            raise FormatError(f"{name}: invalid shape {self.out_features}x{self.in_features}")
        if self.quant_in_features < self.in_features or self.quant_in_features % self.group_size:
            raise FormatError(
                f"{name}: quant_in_features={self.quant_in_features} must be >= in_features={self.in_features} "
                f"and a multiple of group_size={self.group_size}"
            )
        if self.quant_in_features - self.in_features >= self.group_size:
            raise FormatError(f"{name}: quant_in_features pads more than one group")
        if self.num_groups != self.out_features * self.quant_in_features // self.group_size:
            raise FormatError(
                f"{name}: num_groups={self.num_groups} inconsistent with "
                f"{self.out_features}x{self.quant_in_features}/g{self.group_size}"
            )
        dtype_from_name(self.linear_dtype, torch.bfloat16)
        dtype_from_name(self.scale_zero_dtype, torch.float16)

    @property
    def packing(self) -> str:
        return f"int{self.nbits}_packed_u32"

    @property
    def numel(self) -> int:
        return self.out_features * self.quant_in_features

    @property
    def packed_len(self) -> int:
        return packed_length(self.numel, self.nbits)

    @property
    def groups_per_row(self) -> int:
        return self.quant_in_features // self.group_size

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["packing"] = self.packing
        return d

    def expected_shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        sz = dtype_from_name(self.scale_zero_dtype, torch.float16)
        return {
            "W_q_packed": ((self.packed_len,), torch.int32),
            "scale": ((self.num_groups, 1), sz),
            "zero": ((self.num_groups, 1), sz),
        }

    def check_tensor(self, name: str, suffix: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        want_shape, want_dtype = self.expected_shapes()[suffix]
        if tuple(shape) != want_shape:
            raise FormatError(f"{name}.{suffix}: shape {tuple(shape)} != expected {want_shape}")
        if dtype != want_dtype and not (suffix != "W_q_packed" and dtype.is_floating_point):
            raise FormatError(f"{name}.{suffix}: dtype {dtype_name(dtype)} != expected {dtype_name(want_dtype)}")


def check_bits_group(nbits: int, group_size: int) -> None:
    if nbits not in SUPPORTED_BITS:
        raise FormatError(f"--bits {nbits} is not supported; choose one of {', '.join(map(str, SUPPORTED_BITS))}")
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise FormatError(
            f"--group-size {group_size} is not supported; choose one of {', '.join(map(str, SUPPORTED_GROUP_SIZES))}"
        )


# --------------------------------------------------------------------------- (de)quantized tensors


def encode_linear(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: ModuleSpec) -> dict[str, torch.Tensor]:
    """Build the checkpoint tensors of one module from codes (out, quant_in) and per-group
    scale/zero of shape (out, groups_per_row)."""
    if tuple(codes.shape) != (spec.out_features, spec.quant_in_features):
        raise FormatError(f"codes shape {tuple(codes.shape)} != {(spec.out_features, spec.quant_in_features)}")
    sz = dtype_from_name(spec.scale_zero_dtype, torch.float16)
    return {
        "W_q_packed": pack_codes(codes, spec.nbits),
        "scale": scale.reshape(-1, 1).to(sz).contiguous(),
        "zero": zero.reshape(-1, 1).to(sz).contiguous(),
    }


def dequantize(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: ModuleSpec,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dequantize one module to a dense (out_features, in_features) weight."""
    codes = unpack_codes(packed, spec.nbits, spec.numel).view(spec.num_groups, spec.group_size)
    w = (codes.to(torch.float32) - zero.reshape(-1, 1).to(torch.float32)) * scale.reshape(-1, 1).to(torch.float32)
    w = w.view(spec.out_features, spec.quant_in_features)[:, : spec.in_features]
    return w.to(dtype).contiguous()


# --------------------------------------------------------------------------- dashq_config.json


@dataclass
class DashQConfig:
    modules: dict[str, ModuleSpec]
    base_model: str | None = None
    model_class: str = "causal_lm"
    method: str = "dashq"
    extra: dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, data: Any, source: str = CONFIG_FILENAME) -> "DashQConfig":
        if not isinstance(data, dict):
            raise FormatError(f"{source}: expected a JSON object")
        fmt = data.get("format")
        if fmt != FORMAT:
            raise FormatError(f"{source}: unknown format {fmt!r}; expected {FORMAT!r}")
        version = data.get("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise FormatError(f"{source}: format_version {version!r} is not supported (expected {FORMAT_VERSION})")
        mods = data.get("quantized_modules")
        if not isinstance(mods, dict) or not mods:
            raise FormatError(f"{source}: 'quantized_modules' must be a non-empty object")
        modules = {name: ModuleSpec.from_dict(name, meta) for name, meta in mods.items()}
        known = {"format", "format_version", "quantized_modules", "base_model", "model_class", "method"}
        return cls(modules, data.get("base_model"), data.get("model_class", "causal_lm"),
                   data.get("method", "dashq"), {k: v for k, v in data.items() if k not in known})

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "base_model": self.base_model,
            "model_class": self.model_class,
            "method": self.method,
        }
        out.update(self.extra or {})
        out["quantized_modules"] = {n: s.to_dict() for n, s in self.modules.items()}
        return out

    def summary(self) -> tuple[int | None, int | None]:
        """(bits, group_size) when uniform over modules, else None for the mixed field."""
        bits = {s.nbits for s in self.modules.values()}
        groups = {s.group_size for s in self.modules.values()}
        return (bits.pop() if len(bits) == 1 else None, groups.pop() if len(groups) == 1 else None)


def load_dashq_config(model_dir: str | Path) -> DashQConfig:
    path = Path(model_dir) / CONFIG_FILENAME
    if not path.is_file():
        raise FormatError(f"{model_dir}: no {CONFIG_FILENAME}; not a DASH-Q checkpoint")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: unreadable JSON ({e})") from None
    return DashQConfig.from_dict(data, str(path))


def quantization_config_entry(cfg: DashQConfig) -> dict[str, Any]:
    """The ``quantization_config`` written into config.json so vLLM detects the method."""
    bits, group = cfg.summary()
    return {"quant_method": "dashq", "bits": bits, "group_size": group, "format": FORMAT,
            "format_version": FORMAT_VERSION}
