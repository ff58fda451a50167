"""The vLLM quantization method ``dashq``: config, linear method and weight loading.

Loaded in every vLLM process by :mod:`dashq_vllm.plugin` (``vllm.general_plugins`` entry
point); importing this module registers the method. It follows vLLM's own GPTQ/AWQ methods:

* :class:`DashQVllmConfig` (``@register_quantization_config("dashq")``) reads the per-module
  nbits/group size from either source:

  - ``config.json`` ``quantization_config = {"quant_method": "dashq", ...}`` (what our
    quantizer writes): vLLM detects the method; the module table is read from the
    checkpoint's ``dashq_config.json`` in :meth:`DashQVllmConfig.maybe_update_config`;
  - ``dashq_config.json`` alone (the DASH-Q author's public checkpoints) with
    ``--quantization dashq``: it is listed in :meth:`get_config_filenames`, so vLLM hands it
    to :meth:`from_config`.

  Modules not listed in ``quantized_modules`` (lm_head, embeddings, anything the quantizer
  skipped) get vLLM's unquantized methods. MoE checkpoints are refused.

* :class:`DashQLinearMethod` (``@register_weight_loader_v2_supported_method``) creates the
  parameters ``W_q_packed``, ``scale`` and ``zero`` (named like the checkpoint tensors) for
  plain, merged (``qkv_proj``, ``gate_up_proj``) and tensor-parallel (column and row) layers.

Weight loading writes straight into the kernels' layout (see ``dashq_vllm.kernels``): the
``W_q_packed`` parameter *is* the kernel ``qweight`` (int32 ``(Kp * bits // 32, N)``, packed
along K, ``Kp = kernels.padded_k(K, bits)``), allocated at its final size. Its loader takes the checkpoint's flat code stream
(rows straddle 32-bit words at 3 bits, so nothing is word-aligned), unpacks only the rows this
rank needs, in bounded chunks, on the parameter's device, and packs them into this shard's
columns with ``kernels.pack_kernel_codes``. ``scale``/``zero`` are stored transposed
``(Kp / group, N)`` (zero beyond K). After loading, :meth:`DashQLinearMethod.process_weights_after_loading`
folds ``zero`` into ``szeros = -zero * scale`` and renames the tensors to ``qweight`` /
``scales`` / ``szeros``, freeing the originals. So device memory during load is the final
size plus one chunk of temporaries; nothing is ever materialised at 8 bits per weight.

Shards of one merged layer may differ in bits or group size (mixed precision): the layer then
uses the largest bit width and the smallest group size of its shards, which represents every
shard exactly (a 2-bit code is a valid 4-bit code; a scale of a 128-group is repeated for its
32-groups).

Tensor parallelism: column-parallel layers split N (rows of the checkpoint module, including
replicated KV heads); row-parallel layers split K, which must be group aligned (refused with a
clear error otherwise).

:meth:`DashQLinearMethod.apply` is one call of the ``dashq::linear`` custom op (Triton on CUDA,
the torch reference elsewhere): no host syncs, no repacking, static shapes and ints, so it
works under torch.compile and CUDA graphs. On the CPU the default (``DASHQ_CPU_MODE=dense``)
dequantizes each layer once after loading and runs a plain matmul, because the op's torch
reference dequantizes the whole weight on every call; ``DASHQ_CPU_MODE=op`` keeps the packed
weights and the op (what the tiny-model tests run).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.nn import Parameter

from vllm.logger import init_logger
from vllm.model_executor.layers.linear import (
    LinearBase,
    LinearMethodBase,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
    UnquantizedLinearMethod,
    WEIGHT_LOADER_V2_SUPPORTED,
    register_weight_loader_v2_supported_method,
)
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase
from vllm.model_executor.parameter import BasevLLMParameter
from vllm.platforms import current_platform

from dashq_vllm import kernels
from dashq_vllm.format import (
    CONFIG_FILENAME,
    FORMAT,
    TENSOR_SUFFIXES,
    DashQConfig,
    FormatError,
    ModuleSpec,
    dtype_from_name,
    load_dashq_config,
    unpack_codes,
    values_per_word,
)

logger = init_logger(__name__)

METHOD_NAME = "dashq"
# Codes unpacked per step while loading (bounds the temporaries: ~24 bytes per code).
LOAD_CHUNK_CODES = int(os.environ.get("DASHQ_LOAD_CHUNK_CODES", 1 << 23))
_QKV_INDEX = {"q": 0, "k": 1, "v": 2}
_MOE_ATTRS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def cpu_mode() -> str:
    """How layers on the CPU compute: ``dense`` (default; dequantized once at load, then a
    plain matmul: fast, 16 bits per weight) or ``op`` (the ``dashq::linear`` op every call:
    packed weights, the kernels' slow torch reference). Set with ``DASHQ_CPU_MODE``."""
    mode = os.environ.get("DASHQ_CPU_MODE", "dense").strip().lower()
    if mode not in ("dense", "op"):
        raise ValueError(f"DASHQ_CPU_MODE={mode!r}: expected 'dense' or 'op'")
    return mode


class DashQLoadError(FormatError):
    """A DASH-Q checkpoint does not fit the model vLLM built for it."""


def _is_moe(hf_config: Any) -> str | None:
    """The attribute that marks ``hf_config`` (or its text config) as a mixture of experts."""
    if hf_config is None:
        return None
    configs = [hf_config]
    get_text = getattr(hf_config, "get_text_config", None)
    if callable(get_text):
        try:
            configs.append(get_text())
        except Exception:  # pragma: no cover - exotic configs
            pass
    for cfg in configs:
        for attr in _MOE_ATTRS:
            val = getattr(cfg, attr, None)
            if isinstance(val, int) and not isinstance(val, bool) and val > 0:
                return attr
    return None


def _moe_error(what: str) -> DashQLoadError:
    return DashQLoadError(
        f"{what}: mixture-of-experts models are not supported by the DASH-Q vLLM method yet "
        "(dense Llama/Qwen2/Qwen3/Mistral/Gemma-style models only)"
    )


# --------------------------------------------------------------------------- config


@register_quantization_config(METHOD_NAME)
class DashQVllmConfig(QuantizationConfig):
    """``dashq``: DASH-Q dashq-packed-linear checkpoints (2/3/4/8-bit, grouped, asymmetric)."""

    def __init__(self, dashq: DashQConfig | None = None, hf_entry: dict[str, Any] | None = None):
        super().__init__()
        self.hf_entry = dict(hf_entry or {})
        self.dashq: DashQConfig | None = None
        self.modules: dict[str, ModuleSpec] = {}
        if dashq is not None:
            self._set_dashq(dashq)

    def _set_dashq(self, dashq: DashQConfig) -> None:
        self.dashq = dashq
        self.modules = dict(dashq.modules)
        experts = [n for n in self.modules if ".experts." in n or n.endswith(".experts")]
        if experts:
            raise _moe_error(f"{CONFIG_FILENAME} quantizes expert module {experts[0]}")

    def __repr__(self) -> str:
        bits = sorted({s.nbits for s in self.modules.values()})
        groups = sorted({s.group_size for s in self.modules.values()})
        return f"DashQVllmConfig(modules={len(self.modules)}, bits={bits}, group_size={groups})"

    # ---- QuantizationConfig interface

    @classmethod
    def get_name(cls) -> str:
        return METHOD_NAME

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        dtypes = [torch.float16, torch.bfloat16]
        if not current_platform.is_cuda_alike():
            dtypes.append(torch.float32)  # the torch reference path computes in float32 anyway
        return dtypes

    @classmethod
    def get_min_capability(cls) -> int:
        return 75  # Triton kernels (Turing and newer)

    @staticmethod
    def get_config_filenames() -> list[str]:
        return [CONFIG_FILENAME]

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "DashQVllmConfig":
        """From ``dashq_config.json`` (full module table) or from config.json's
        ``quantization_config`` entry (the table is then read in :meth:`maybe_update_config`)."""
        if not isinstance(config, dict):
            raise FormatError("DASH-Q quantization config must be a JSON object")
        if "quant_method" not in config:  # dashq_config.json itself
            return cls(DashQConfig.from_dict(config, CONFIG_FILENAME))
        method = str(config.get("quant_method", "")).lower()
        if method != METHOD_NAME:
            raise FormatError(f"quantization_config has quant_method {config.get('quant_method')!r}, expected 'dashq'")
        fmt = config.get("format", FORMAT)
        if fmt != FORMAT:
            raise FormatError(f"quantization_config: unknown format {fmt!r}; expected {FORMAT!r}")
        if isinstance(config.get("quantized_modules"), dict):
            return cls(DashQConfig.from_dict({"format": FORMAT, **config}), hf_entry=config)
        return cls(None, hf_entry=config)

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg: dict[str, Any], user_quant: str | None,
                                     hf_config: Any = None) -> str | None:
        method = str(hf_quant_cfg.get("quant_method", "")).lower()
        is_dashq = method == METHOD_NAME or (not method and hf_quant_cfg.get("format") == FORMAT)
        if is_dashq and user_quant in (None, METHOD_NAME):
            return METHOD_NAME
        return None

    def maybe_update_config(self, model_name: str, hf_config: Any = None, revision: str | None = None) -> None:
        if self.dashq is None:
            self._set_dashq(_load_remote_or_local(model_name, revision))
        if (attr := _is_moe(hf_config)) is not None:
            raise _moe_error(f"{model_name} ({attr} set in config.json)")

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        """Rename the HF module names of ``quantized_modules`` to the vLLM model's (for models
        whose vLLM module tree differs from the HF one, e.g. multimodal wrappers)."""
        if not self.modules:
            return
        map_name = getattr(hf_to_vllm_mapper, "map_name", None) or getattr(hf_to_vllm_mapper, "_map_name", None)
        if map_name is None:  # pragma: no cover - other vLLM versions
            return
        mapped = {}
        for name, spec in self.modules.items():
            new = map_name(name)
            mapped[new if new is not None else name] = spec
        self.modules = mapped

    def _ensure_modules(self) -> None:
        """The module table, when vLLM did not call :meth:`maybe_update_config` (older versions):
        read dashq_config.json from the model directory of the config being built."""
        if self.dashq is not None:
            return
        try:
            from vllm.config import get_current_vllm_config

            model_config = get_current_vllm_config().model_config
            model, revision = model_config.model, getattr(model_config, "revision", None)
        except Exception as e:  # noqa: BLE001
            raise DashQLoadError(f"DASH-Q: cannot locate {CONFIG_FILENAME} ({e})") from None
        self._set_dashq(_load_remote_or_local(model, revision))

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        try:
            from vllm.model_executor.layers.fused_moe import RoutedExperts
        except ImportError:  # pragma: no cover - older vLLM
            from vllm.model_executor.layers.fused_moe import FusedMoE as RoutedExperts
        if isinstance(layer, RoutedExperts):
            raise _moe_error(f"layer {prefix}")
        if not isinstance(layer, LinearBase):
            return None  # embeddings, lm_head: unquantized
        self._ensure_modules()
        names = self._shard_names(prefix)
        specs = [self.modules.get(n) for n in names]
        if all(s is None for s in specs):
            return UnquantizedLinearMethod()
        if any(s is None for s in specs):
            have = [n for n, s in zip(names, specs) if s is not None]
            miss = [n for n, s in zip(names, specs) if s is None]
            raise DashQLoadError(
                f"{prefix}: vLLM fuses {', '.join(names)} into one layer, but only {', '.join(have)} "
                f"are quantized in {CONFIG_FILENAME} ({', '.join(miss)} are not); quantize all or none of them"
            )
        return DashQLinearMethod(self, prefix, names, specs)  # type: ignore[arg-type]

    def _shard_names(self, prefix: str) -> list[str]:
        """Checkpoint module names that make up the vLLM layer ``prefix``."""
        if prefix in self.modules:
            return [prefix]  # plain layer, or fused on disk
        head, _, proj = prefix.rpartition(".")
        shards = self.packed_modules_mapping.get(proj)
        if shards:
            return [f"{head}.{s}" if head else s for s in shards]
        return [prefix]


def _load_remote_or_local(model_name: str, revision: str | None) -> DashQConfig:
    if os.path.isdir(model_name):
        return load_dashq_config(model_name)
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(model_name, CONFIG_FILENAME, revision=revision)
    except Exception as e:  # noqa: BLE001 - any hub failure means: not found
        raise FormatError(f"{model_name}: cannot find {CONFIG_FILENAME} ({type(e).__name__}: {e})") from None
    return load_dashq_config(Path(path).parent)


# --------------------------------------------------------------------------- geometry


@dataclass
class _Shard:
    """One checkpoint module's part of a (possibly merged, possibly TP-sharded) vLLM layer."""

    name: str
    spec: ModuleSpec
    out_offset: int  # first output column of this shard in the layer's local N
    out_size: int  # local output rows of this shard
    row_start: int  # first checkpoint row (of module ``name``) this rank holds
    ckpt_row_base: int = 0  # row of this shard inside the checkpoint tensor (fused on disk)


@dataclass
class _Geometry:
    prefix: str
    shards: list[_Shard]
    bits: int  # kernel bit width of the layer
    group_size: int  # kernel group size of the layer
    n: int  # local out features
    k: int  # the kernels' K: k_real padded up (kernels.padded_k)
    k_real: int  # checkpoint columns this rank holds (multiple of group_size)
    k_start: int  # first checkpoint column this rank holds (row parallel)
    in_features: int  # local in features of x
    scale_dtype: torch.dtype
    fused_on_disk: bool = False
    loaded: set = field(default_factory=set)


def _layer_geometry(layer: torch.nn.Module, prefix: str, names: list[str], specs: list[ModuleSpec],
                    input_size_per_partition: int, output_partition_sizes: list[int], input_size: int) -> _Geometry:
    tp_rank = int(getattr(layer, "tp_rank", 0))
    tp_size = int(getattr(layer, "tp_size", 1))
    bits = max(s.nbits for s in specs)  # a b-bit code is a valid code at any wider width
    group = min(s.group_size for s in specs)
    for name, spec in zip(names, specs):
        if spec.in_features != input_size:
            raise DashQLoadError(
                f"{name}: checkpoint in_features={spec.in_features} but the model's layer {prefix} "
                f"has input size {input_size}"
            )
        if spec.group_size % group:
            raise DashQLoadError(f"{prefix}: group sizes {[s.group_size for s in specs]} of its parts do not nest")

    # K: row-parallel layers split the checkpoint's columns; they must be group aligned.
    if input_size_per_partition != input_size:
        if input_size_per_partition % group:
            why = (f"{input_size} input features are {input_size // group} groups of {group}"
                   if input_size % group == 0 else
                   f"{input_size} input features are not a whole number of groups of {group}")
            raise DashQLoadError(
                f"{prefix}: tensor parallel size {tp_size} would split DASH-Q groups ({why}, which cannot "
                f"be divided evenly over {tp_size} GPUs); use a smaller tensor parallel size"
            )
        k_real, k_start = input_size_per_partition, tp_rank * input_size_per_partition
    else:
        k_real, k_start = math.ceil(input_size / group) * group, 0
    k = kernels.padded_k(k_real, bits)  # the kernels' K; codes and scales beyond k_real stay zero
    if k % group:
        raise DashQLoadError(f"{prefix}: group size {group} does not divide the kernels' K={k}")

    # N: which checkpoint rows this rank holds, and where they go.
    shards: list[_Shard] = []
    fused_on_disk = len(specs) == 1 and len(output_partition_sizes) > 1
    if fused_on_disk:
        full_sizes = _full_output_sizes(layer, output_partition_sizes, tp_size)
        if sum(full_sizes) != specs[0].out_features:
            raise DashQLoadError(
                f"{names[0]}: checkpoint out_features={specs[0].out_features} but the model's fused layer "
                f"expects {sum(full_sizes)} ({' + '.join(map(str, full_sizes))})"
            )
        off, base = 0, 0
        for i, (size, full) in enumerate(zip(output_partition_sizes, full_sizes)):
            shards.append(_Shard(names[0], specs[0], off, size, _row_start(layer, i, size, tp_rank), base))
            off += size
            base += full
        part_rows = list(full_sizes)
    else:
        if len(specs) != len(output_partition_sizes):
            raise DashQLoadError(
                f"{prefix}: {len(specs)} checkpoint modules for {len(output_partition_sizes)} output partitions"
            )
        full_sizes = _full_output_sizes(layer, output_partition_sizes, tp_size)
        off = 0
        for i, (name, spec, size, full) in enumerate(zip(names, specs, output_partition_sizes, full_sizes)):
            if spec.out_features != full:
                raise DashQLoadError(
                    f"{name}: checkpoint out_features={spec.out_features} but the model's layer {prefix} "
                    f"expects {full}"
                )
            shards.append(_Shard(name, spec, off, size, _row_start(layer, i, size, tp_rank)))
            off += size
        part_rows = [s.out_features for s in specs]
    for sh, rows in zip(shards, part_rows):
        if sh.row_start + sh.out_size > rows:
            raise DashQLoadError(f"{sh.name}: rank {tp_rank} needs rows beyond the checkpoint's out_features")

    sdts = {dtype_from_name(s.scale_zero_dtype, torch.float16) for s in specs}
    scale_dtype = sdts.pop() if len(sdts) == 1 else torch.float32
    return _Geometry(prefix, shards, bits, group, sum(output_partition_sizes), k, k_real, k_start,
                     input_size_per_partition, scale_dtype, fused_on_disk)


def _full_output_sizes(layer, output_partition_sizes: list[int], tp_size: int) -> list[int]:
    """Output rows of each logical part in the *checkpoint* (all ranks together)."""
    if isinstance(layer, QKVParallelLinear):
        v_head = getattr(layer, "v_head_size", layer.head_size)
        return [layer.total_num_heads * layer.head_size, layer.total_num_kv_heads * layer.head_size,
                layer.total_num_kv_heads * v_head]
    if isinstance(layer, (RowParallelLinear, ReplicatedLinear)) or tp_size == 1:
        return list(output_partition_sizes)
    return [s * tp_size for s in output_partition_sizes]


def _row_start(layer, index: int, local_size: int, tp_rank: int) -> int:
    """First checkpoint row of part ``index`` held by this rank (vLLM's own convention)."""
    if isinstance(layer, (RowParallelLinear, ReplicatedLinear)):
        return 0
    if isinstance(layer, QKVParallelLinear) and index > 0:
        return (tp_rank // layer.num_kv_head_replicas) * local_size
    return tp_rank * local_size


# --------------------------------------------------------------------------- parameters


class _DashQParameter(BasevLLMParameter):
    """Base of the DASH-Q parameters: vLLM's v2 loaders call the ``load_*`` methods with the
    checkpoint tensor of one module (and the merged part it belongs to)."""

    def __new__(cls, data: torch.Tensor, *args, **kwargs):
        return super().__new__(cls, data=data)

    def __init__(self, data: torch.Tensor, geometry: _Geometry, kind: str, weight_loader: Callable):
        self._geometry = geometry
        self._kind = kind
        super().__init__(data=data, weight_loader=weight_loader)

    # vLLM v2 loader entry points ------------------------------------------------------

    def load_column_parallel_weight(self, loaded_weight: torch.Tensor) -> None:
        self.load_part(0, loaded_weight)

    def load_row_parallel_weight(self, loaded_weight: torch.Tensor) -> None:
        self.load_part(0, loaded_weight)

    def load_merged_column_weight(self, loaded_weight: torch.Tensor, **kwargs) -> None:
        shard_id = kwargs.get("shard_id")
        if shard_id is None:
            return self.load_fused(loaded_weight)
        self._check_offsets(int(shard_id), kwargs)
        self.load_part(int(shard_id), loaded_weight)

    def load_qkv_weight(self, loaded_weight: torch.Tensor, **kwargs) -> None:
        shard_id = kwargs.get("shard_id")
        if shard_id is None:
            return self.load_fused(loaded_weight)
        idx = _QKV_INDEX[shard_id] if isinstance(shard_id, str) else int(shard_id)
        self._check_offsets(idx, kwargs)
        self.load_part(idx, loaded_weight)

    def _check_offsets(self, idx: int, kwargs: dict) -> None:
        sh = self._geometry.shards[idx]
        off, size = kwargs.get("shard_offset"), kwargs.get("shard_size")
        if (off is not None and off != sh.out_offset) or (size is not None and size != sh.out_size):
            raise DashQLoadError(
                f"{self._geometry.prefix}: vLLM places part {idx} at ({off}, {size}), "
                f"expected ({sh.out_offset}, {sh.out_size})"
            )

    # DASH-Q loading ---------------------------------------------------------------------

    def load_fused(self, loaded_weight: torch.Tensor) -> None:
        """All parts from one checkpoint tensor (a fused-on-disk module, or a plain layer)."""
        for idx in range(len(self._geometry.shards)):
            self.load_part(idx, loaded_weight)

    def load_part(self, idx: int, loaded_weight: torch.Tensor) -> None:
        geom = self._geometry
        if idx >= len(geom.shards):
            raise DashQLoadError(f"{geom.prefix}: no part {idx} (layer has {len(geom.shards)})")
        with torch.no_grad():
            self._load_part(geom.shards[idx], loaded_weight)
        geom.loaded.add((self._kind, idx))

    def _load_part(self, sh: _Shard, loaded: torch.Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


class DashQPackedParameter(_DashQParameter):
    """``W_q_packed``: holds the kernel ``qweight`` (int32 ``(K * bits // 32, N)``); loads the
    checkpoint's flat int32 code stream."""

    def _load_part(self, sh: _Shard, loaded: torch.Tensor) -> None:
        geom, spec = self._geometry, sh.spec
        if loaded.dtype != torch.int32 or loaded.dim() != 1 or loaded.numel() != spec.packed_len:
            raise DashQLoadError(
                f"{sh.name}.W_q_packed: got {str(loaded.dtype).replace('torch.', '')} "
                f"{tuple(loaded.shape)}, expected int32 ({spec.packed_len},) for "
                f"{spec.out_features}x{spec.quant_in_features} codes at {spec.nbits} bits"
            )
        vpw = values_per_word(spec.nbits)
        kq = spec.quant_in_features
        k0, k1 = geom.k_start, geom.k_start + geom.k_real
        if k1 > kq:
            raise DashQLoadError(f"{sh.name}: needs columns {k0}..{k1} beyond quant_in_features={kq}")
        dev = self.data.device
        rows_per_chunk = max(1, LOAD_CHUNK_CODES // kq)
        first = sh.ckpt_row_base + sh.row_start
        for r in range(0, sh.out_size, rows_per_chunk):
            r1 = min(sh.out_size, r + rows_per_chunk)
            a = (first + r) * kq  # first code
            b = (first + r1) * kq  # one past the last code
            w0, w1 = a // vpw, -(-b // vpw)
            words = loaded[w0:w1].to(dev)
            codes = unpack_codes(words, spec.nbits, (w1 - w0) * vpw)
            codes = codes[a - w0 * vpw: b - w0 * vpw].view(r1 - r, kq)[:, k0:k1]
            codes_kn = torch.zeros(geom.k, r1 - r, dtype=torch.uint8, device=dev)
            codes_kn[: geom.k_real] = codes.t()
            qw = kernels.pack_kernel_codes(codes_kn, geom.bits)
            self.data[:, sh.out_offset + r: sh.out_offset + r1].copy_(qw)


class DashQGroupParameter(_DashQParameter):
    """``scale`` / ``zero``: stored transposed ``(K / group, N)`` at the layer's group size;
    loads the checkpoint's ``(num_groups, 1)`` tensor."""

    def _load_part(self, sh: _Shard, loaded: torch.Tensor) -> None:
        geom, spec = self._geometry, sh.spec
        if loaded.numel() != spec.num_groups or not loaded.dtype.is_floating_point:
            raise DashQLoadError(
                f"{sh.name}.{self._kind}: got {str(loaded.dtype).replace('torch.', '')} {tuple(loaded.shape)}, "
                f"expected float ({spec.num_groups}, 1)"
            )
        first = sh.ckpt_row_base + sh.row_start
        rows = loaded.reshape(-1, spec.groups_per_row)[first: first + sh.out_size].to(self.data.device)
        rep = spec.group_size // geom.group_size
        if rep > 1:
            rows = rows.repeat_interleave(rep, dim=1)
        g0, ng = geom.k_start // geom.group_size, geom.k_real // geom.group_size
        rows = rows[:, g0: g0 + ng]
        self.data[:ng, sh.out_offset: sh.out_offset + sh.out_size].copy_(rows.t())


# --------------------------------------------------------------------------- linear method


@register_weight_loader_v2_supported_method
class DashQLinearMethod(LinearMethodBase):
    """Linear method for DASH-Q packed weights (see the module docstring)."""

    def __init__(self, quant_config: DashQVllmConfig, prefix: str, names: list[str], specs: list[ModuleSpec]):
        self.quant_config = quant_config
        self.prefix = prefix
        self.names = names
        self.specs = specs

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype, **extra_weight_attrs) -> None:
        geom = _layer_geometry(layer, self.prefix, self.names, self.specs, input_size_per_partition,
                               output_partition_sizes, input_size)
        loader = _make_loader(layer, geom, extra_weight_attrs.get("weight_loader"))
        rows = kernels.qweight_rows(geom.bits, geom.k)
        groups = geom.k // geom.group_size
        qweight = DashQPackedParameter(torch.zeros(rows, geom.n, dtype=torch.int32), geom, "W_q_packed", loader)
        scale = DashQGroupParameter(torch.zeros(groups, geom.n, dtype=geom.scale_dtype), geom, "scale", loader)
        zero = DashQGroupParameter(torch.zeros(groups, geom.n, dtype=geom.scale_dtype), geom, "zero", loader)
        layer.register_parameter("W_q_packed", qweight)
        layer.register_parameter("scale", scale)
        layer.register_parameter("zero", zero)
        layer.dashq_geometry = geom
        layer.dashq_params_dtype = params_dtype

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        geom: _Geometry = layer.dashq_geometry
        if not hasattr(layer, "W_q_packed"):
            return  # already processed
        missing = [f"{sh.name}.{kind}" for i, sh in enumerate(geom.shards)
                   for kind in TENSOR_SUFFIXES if (kind, i) not in geom.loaded]
        # Nothing loaded at all means --load-format dummy (a wholly missing layer is caught by
        # vLLM's own "weights not initialized" check); a partial load is a broken checkpoint.
        if missing and geom.loaded:
            raise DashQLoadError(f"{geom.prefix}: checkpoint tensors never loaded: {', '.join(missing[:4])}")
        qweight = layer.W_q_packed.data
        s = layer.scale.data.to(torch.float32)
        sz = -layer.zero.data.to(torch.float32) * s
        del layer.W_q_packed, layer.scale, layer.zero
        # Scales stay float16 when exact (the checkpoint's dtype) and the folded zeros fit;
        # otherwise the activation dtype. The kernels convert them to float32 anyway.
        act = layer.dashq_params_dtype if layer.dashq_params_dtype in (torch.float16, torch.bfloat16) else torch.float32
        sdt = torch.float16 if geom.scale_dtype == torch.float16 and bool(torch.isfinite(sz.to(torch.float16)).all()) else act
        layer.register_parameter("qweight", Parameter(qweight, requires_grad=False))
        layer.register_parameter("scales", Parameter(s.to(sdt).contiguous(), requires_grad=False))
        layer.register_parameter("szeros", Parameter(sz.to(sdt).contiguous(), requires_grad=False))
        del s, sz
        layer.dashq_dense = qweight.device.type == "cpu" and cpu_mode() == "dense"
        if layer.dashq_dense:
            # CPU serving: dequantize once here instead of in every forward (the op's CPU path
            # is the unoptimised torch reference, ~10x slower than a dense matmul).
            w = self.dequantize_weight(layer).to(layer.dashq_params_dtype).contiguous()
            layer.register_parameter("dashq_weight", Parameter(w, requires_grad=False))

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if layer.dashq_dense:
            return F.linear(x, layer.dashq_weight, bias)
        g: _Geometry = layer.dashq_geometry
        return kernels.dashq_linear(x, layer.qweight, layer.scales, layer.szeros, g.bits, g.group_size, g.n, g.k, bias)

    def dequantize_weight(self, layer: torch.nn.Module) -> torch.Tensor:
        """Dense (N, in_features) weight of this rank (for debugging and requantization)."""
        g: _Geometry = layer.dashq_geometry
        w = kernels.dequantize_kernel_weight(layer.qweight, layer.scales, layer.szeros, g.bits, g.group_size)
        return w[:, : g.in_features]


def _make_loader(layer: torch.nn.Module, geom: _Geometry, layer_loader: Callable | None) -> Callable:
    """The parameters' ``weight_loader``: vLLM's v2 loader of the layer for the usual cases
    (it calls our ``load_*`` methods with vLLM's shard offsets); our own path for layers whose
    loader is not v2 (ReplicatedLinear) and for merged modules fused on disk (no shard id)."""
    uses_v2 = layer_loader is not None and getattr(layer_loader, "__name__", "") == "weight_loader_v2"
    merged = isinstance(layer, (MergedColumnParallelLinear, QKVParallelLinear))

    def weight_loader(param: torch.nn.Parameter, loaded_weight: torch.Tensor, loaded_shard_id=None):
        if not isinstance(param, _DashQParameter):  # pragma: no cover - not ours
            assert layer_loader is not None
            return layer_loader(param, loaded_weight, *([] if loaded_shard_id is None else [loaded_shard_id]))
        if loaded_shard_id is None and (merged or not uses_v2):
            return param.load_fused(loaded_weight)
        if not uses_v2:
            idx = _QKV_INDEX[loaded_shard_id] if isinstance(loaded_shard_id, str) else int(loaded_shard_id)
            return param.load_part(idx, loaded_weight)
        if loaded_shard_id is None:
            return layer_loader(param, loaded_weight)
        return layer_loader(param, loaded_weight, loaded_shard_id)

    return weight_loader


assert DashQLinearMethod.__name__ in WEIGHT_LOADER_V2_SUPPORTED
