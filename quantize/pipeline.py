"""Layer-by-layer quantization of a Hugging Face causal LM into a DASH-Q checkpoint.

For every decoder block: run the calibration samples through it (its inputs come from the
already-quantized previous blocks), collect activation statistics of each linear, solve each
linear (DASH-Q, RTN or GPTQ), put the dequantized weights back so the block's outputs feed the
next block as the served model will compute them, then move on. lm_head and embeddings stay
unquantized.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from dashq_vllm.checkpoint import CheckpointFiles, atomic_output_dir, save_tensors_sharded
from dashq_vllm.format import (DashQConfig, FormatError, ModuleSpec, check_bits_group, dtype_name,
                               encode_linear, quantization_config_entry)

from . import solver
from .assets import hf_progress
from .calibration import (ActivationStats, BlockInputs, QuantizeError, block_linears,
                          capture_first_block_inputs, collect_stats, decoder_layers, is_moe, run_block,
                          token_windows)
from .gptq import gptq

METHODS = ("dashq", "rtn", "gptq")
WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")


@dataclass
class QuantizeOptions:
    bits: int = 4
    group_size: int = 128
    method: str = "dashq"
    calib: str = "news"
    nsamples: int = 128
    seqlen: int = 2048
    iters: int = 10
    damping: float = 0.01
    tol: float = 1e-4
    device: str = "auto"
    seed: int = 0
    max_shard_bytes: int = 2 * 1024**3

    def validate(self) -> None:
        if self.method not in METHODS:
            raise QuantizeError(f"--method {self.method!r} is not one of {', '.join(METHODS)}")
        try:
            check_bits_group(self.bits, self.group_size)
        except FormatError as e:
            raise QuantizeError(str(e)) from None
        if self.iters < 1:
            raise QuantizeError("--iters must be >= 1")
        if not (0 <= self.damping < 10):
            raise QuantizeError("--damping must be in [0, 10)")


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    err_rtn: float  # relative weighted error sum h (w - w_hat)^2 / sum h w^2 of min/max RTN
    err_method: float  # the same for the chosen method
    iters: int
    solve_s: float


@dataclass
class QuantizeResult:
    out_dir: Path
    layers: list[LayerReport] = field(default_factory=list)
    wall_s: float = 0.0
    solver_s: float = 0.0
    calib_s: float = 0.0
    peak_rss_mb: float = 0.0
    peak_gpu_mb: float = 0.0

    def to_dict(self) -> dict:
        return {
            "out_dir": str(self.out_dir), "wall_s": self.wall_s, "solver_s": self.solver_s,
            "calib_s": self.calib_s, "peak_rss_mb": self.peak_rss_mb, "peak_gpu_mb": self.peak_gpu_mb,
            "layers": [vars(r) for r in self.layers],
        }


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise QuantizeError("--device cuda requested but no CUDA GPU is available")
    if name not in ("cpu", "cuda"):
        raise QuantizeError(f"--device {name!r} must be auto, cpu or cuda")
    return torch.device(name)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------- one linear


def quantize_weight(weight: torch.Tensor, stats: ActivationStats, opts: QuantizeOptions) -> tuple[solver.GroupQuant, LayerReport]:
    """Quantize one (out, in) weight with its activation statistics; returns the quantization
    (codes shaped (out, groups, group_size)) and its error report."""
    t0 = time.perf_counter()
    w = solver.group_view(weight.float(), opts.group_size)
    h = solver.hessian_group_view(solver.damp_hessian_diag(stats.diag, opts.damping), opts.group_size)
    if opts.method == "dashq":
        gq = solver.dashq(w, h, opts.bits, iters=opts.iters, tol=opts.tol)
    elif opts.method == "rtn":
        gq = solver.rtn(w, opts.bits)
    else:
        k_pad = w.shape[1] * opts.group_size
        gram = torch.nn.functional.pad(stats.gram, (0, k_pad - stats.gram.shape[0], 0, k_pad - stats.gram.shape[0]))
        gq = gptq(w.reshape(w.shape[0], -1), gram, opts.bits, opts.group_size, damping=opts.damping)
    if weight.is_cuda:
        torch.cuda.synchronize()
    solve_s = time.perf_counter() - t0
    ref = (h * w * w).sum().clamp(min=1e-30)
    err_method = float(solver.weighted_error(w, gq.dequantize(), h).sum() / ref)
    err_rtn = float(solver.weighted_error(w, solver.rtn(w, opts.bits).dequantize(), h).sum() / ref)
    return gq, LayerReport("", tuple(weight.shape), err_rtn, err_method, gq.iterations, solve_s)


# --------------------------------------------------------------------------- the model


def load_source_model(src: Path, device: torch.device):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not src.is_dir():
        raise QuantizeError(f"{src}: model directory not found")
    if not (src / "config.json").is_file():
        raise QuantizeError(f"{src}: config.json is missing; not a Hugging Face model directory")
    try:
        config = AutoConfig.from_pretrained(src)
    except Exception as e:  # transformers raises many types for bad configs
        raise QuantizeError(f"{src}/config.json: cannot be read ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if getattr(config, "quantization_config", None):
        raise QuantizeError(f"{src}: already quantized ({config.quantization_config.get('quant_method', '?')}); give an unquantized model")
    if is_moe(config):
        raise QuantizeError(f"{src}: mixture-of-experts models are not supported yet")
    try:
        files = CheckpointFiles(src)
    except FormatError as e:
        raise QuantizeError(str(e)) from None
    try:
        # Decoder blocks stay in the dtype the weights are stored in (half the memory of fp32 for
        # bf16/fp16 files) and are upcast one at a time when quantized; the rest runs in fp32.
        model = AutoModelForCausalLM.from_pretrained(src, dtype=storage_dtype(files))
    except ValueError as e:
        raise QuantizeError(f"{src}: unsupported model ({str(e).splitlines()[0]})") from None
    except Exception as e:
        raise QuantizeError(f"{src}: cannot load weights ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    model.eval()
    move_outside_blocks(model, dtype=torch.float32)  # raises for unsupported architectures
    _restore_fp32_buffers(model)
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise QuantizeError(f"{src}: weight {name} contains NaN or Inf values")
    tok = AutoTokenizer.from_pretrained(src)
    return model, tok, files


def calibration_samples(tok, opts: QuantizeOptions) -> torch.Tensor:
    from .data import get_text

    try:
        text = get_text(opts.calib)
    except (OSError, ValueError, RuntimeError) as e:
        raise QuantizeError(f"calibration text {opts.calib!r}: {e}") from None
    if not text.strip():
        raise QuantizeError(f"calibration text {opts.calib!r} is empty")
    ids = tok(text, add_special_tokens=False, verbose=False)["input_ids"]
    return token_windows(ids, opts.nsamples, opts.seqlen, opts.seed)


def quantize_blocks(model: nn.Module, samples: torch.Tensor, opts: QuantizeOptions, device: torch.device,
                    result: QuantizeResult, progress: bool = True) -> dict[str, dict[str, torch.Tensor]]:
    """Quantize every linear of every decoder block in place; return checkpoint tensors per module."""
    layers = decoder_layers(model)
    prefix = _layers_prefix(model, layers)
    uses_data = opts.method != "rtn"  # RTN needs no calibration passes
    if uses_data:
        move_outside_blocks(model, device=device)  # the embeddings etc., for the capture pass only
        t0 = time.perf_counter()
        inputs = capture_first_block_inputs(model, samples, device)
        result.calib_s += time.perf_counter() - t0
        move_outside_blocks(model, device="cpu")
        inputs = BlockInputs([h.to(device) for h in inputs.hidden], _to_device(inputs.kwargs, device))
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    bar = tqdm(range(len(layers)), desc=f"{opts.method} {opts.bits}-bit g{opts.group_size}", unit="block", disable=not progress)
    for i in bar:
        block = layers[i].to(device=device, dtype=torch.float32)
        first_report = len(result.layers)
        t0 = time.perf_counter()
        stats = collect_stats(block, inputs, full_gram=opts.method == "gptq") if uses_data else uniform_stats(block, device)
        result.calib_s += time.perf_counter() - t0
        for name, lin in block_linears(block).items():
            full = f"{prefix}.{i}.{name}"
            gq, rep = quantize_weight(lin.weight.data, stats[name], opts)
            rep.name = full
            result.layers.append(rep)
            result.solver_s += rep.solve_s
            spec = ModuleSpec.create(lin.in_features, lin.out_features, opts.bits, opts.group_size,
                                     linear_dtype=dtype_name(_source_dtype(model)))
            tensors[full] = encode_linear(gq.codes.reshape(spec.out_features, -1).cpu(), gq.scale.cpu(), gq.zero.cpu(), spec)
            # Continue with what the checkpoint will hold: fp16 scale/zero, dequantized weight.
            lin.weight.data = gq.dequantize().reshape(spec.out_features, -1)[:, : lin.in_features].to(lin.weight.dtype)
        del stats
        if uses_data:
            t0 = time.perf_counter()
            inputs.hidden = run_block(block, inputs)
            result.calib_s += time.perf_counter() - t0
        layers[i] = block.to("meta")  # done: its tensors are encoded, the checkpoint copies the rest from src
        if device.type == "cuda":
            torch.cuda.empty_cache()
        bar.set_postfix(err=f"{_mean_err(result.layers[first_report:]):.4f}")
    return tensors


def storage_dtype(files: CheckpointFiles) -> torch.dtype:
    """The dtype the floating weights are stored in (not the config's, which may differ), fp32 if mixed."""
    found = {files.shape_dtype(k)[1] for k in files.keys()} & {torch.float32, torch.float16, torch.bfloat16}
    return found.pop() if len(found) == 1 else torch.float32


def move_outside_blocks(model: nn.Module, device=None, dtype: torch.dtype | None = None) -> None:
    """Move/cast every parameter and buffer of ``model`` except those of its decoder blocks
    (embeddings, final norm, rotary tables, lm_head): what the capture pass needs on the device."""
    layers = decoder_layers(model)
    to = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}

    def visit(module: nn.Module) -> None:
        for t in (*module._parameters.values(), *module._buffers.values()):
            if t is not None:
                t.data = t.data.to(**to) if t.is_floating_point() else t.data.to(device=to.get("device", t.device))
        for child in module.children():
            if child is layers:
                continue
            if any(m is layers for m in child.modules()):
                visit(child)
            else:
                child.to(**to)

    visit(model)


def _restore_fp32_buffers(model: nn.Module) -> None:
    """Non-persistent buffers outside the blocks (e.g. Gemma-3's embedding scale) are computed when
    the model is built, in the dtype it is built in: recompute them in fp32, as a model loaded in
    fp32 has them, from a one-block, small-vocabulary fp32 copy of the architecture."""
    import copy

    from .model_io import model_from_config

    persistent = set(model.state_dict())
    in_blocks = _layers_prefix(model, decoder_layers(model)) + "."
    names = [n for n, b in model.named_buffers() if n not in persistent and b.is_floating_point()
             and not n.startswith(in_blocks)]
    if not names:
        return
    cfg = copy.deepcopy(model.config)
    cfg.num_hidden_layers, cfg.vocab_size = 1, 16
    for attr in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if hasattr(cfg, attr):
            setattr(cfg, attr, None)
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = cfg.layer_types[:1]
    try:
        fresh = dict(model_from_config(cfg, torch.float32).named_buffers())
    except Exception as e:  # noqa: BLE001 - an architecture that cannot be shrunk keeps its cast buffers
        warnings.warn(f"buffers {', '.join(names)} kept as built in the weights' dtype, cast to fp32 "
                      f"(a one-block copy could not be built: {type(e).__name__}: {e})", stacklevel=2)
        return
    for name in names:
        if name in fresh and fresh[name].shape == model.get_buffer(name).shape:
            model.get_buffer(name).data = fresh[name].to(torch.float32)


def uniform_stats(block: nn.Module, device: torch.device) -> dict[str, ActivationStats]:
    """Stand-in statistics (h = 1) for methods that use no calibration data."""
    stats = {}
    for name, lin in block_linears(block).items():
        stats[name] = ActivationStats(lin.in_features, device, full=False)
        stats[name].diag.fill_(1.0)
    return stats


def _mean_err(reports: list[LayerReport]) -> float:
    return sum(r.err_method for r in reports) / max(len(reports), 1)


def _layers_prefix(model: nn.Module, layers: nn.ModuleList) -> str:
    for name, mod in model.named_modules():
        if mod is layers:
            return name
    raise QuantizeError("cannot locate decoder layers in the model")


def _source_dtype(model: nn.Module) -> torch.dtype:
    dt = getattr(model.config, "dtype", None) or getattr(model.config, "torch_dtype", None)
    if isinstance(dt, str):
        dt = getattr(torch, dt, None)
    return dt if isinstance(dt, torch.dtype) and dt.is_floating_point and dt != torch.float32 else torch.bfloat16


def _to_device(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


# --------------------------------------------------------------------------- writing


def write_checkpoint(src: Path, out: Path, source_files: CheckpointFiles, quantized: dict[str, dict[str, torch.Tensor]],
                     opts: QuantizeOptions, force: bool, base_model: str, specs: dict[str, ModuleSpec]) -> None:
    """Unquantized tensors are copied bit-exactly from the source; quantized linears replace
    their ``.weight`` by W_q_packed/scale/zero (bias kept)."""
    tensors: dict[str, torch.Tensor] = {}
    dropped = {f"{name}.weight" for name in quantized}
    for key, t in source_files.load():
        if key not in dropped:
            tensors[key] = t
    for name, parts in quantized.items():
        for suffix, t in parts.items():
            tensors[f"{name}.{suffix}"] = t
    cfg = DashQConfig(specs, base_model=base_model, method=opts.method,
                      extra={"calibration": {"text": opts.calib, "nsamples": opts.nsamples, "seqlen": opts.seqlen,
                                             "iters": opts.iters, "damping": opts.damping, "seed": opts.seed}})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = quantization_config_entry(cfg)
    try:
        with atomic_output_dir(out, force=force) as tmp:
            save_tensors_sharded(tensors, tmp, opts.max_shard_bytes)
            (tmp / "dashq_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
            (tmp / "config.json").write_text(json.dumps(config, indent=2))
            for f in src.iterdir():
                if f.is_file() and f.name not in ("config.json", "model.safetensors.index.json") \
                        and not f.name.endswith(WEIGHT_FILE_SUFFIXES) and not f.name.startswith("."):
                    shutil.copy2(f, tmp / f.name)
    except FileExistsError as e:
        raise QuantizeError(str(e)) from None
    except PermissionError as e:
        raise QuantizeError(f"output not writable: {e}") from None
    except OSError as e:
        raise QuantizeError(f"writing {out} failed ({e.strerror or e}); nothing was left behind") from None


def check_output(out: Path, force: bool) -> None:
    """Fail before any expensive work if the destination cannot be written."""
    if out.exists() and not force:
        raise QuantizeError(f"{out} already exists; pass --force to overwrite it")
    parent = out.absolute().parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise QuantizeError(f"output path {out}: {probe} is not a directory")
    if not os.access(probe, os.W_OK):
        raise QuantizeError(f"output directory {parent} is not writable")


def quantize_model(src: str | Path, out: str | Path, opts: QuantizeOptions, force: bool = False,
                   progress: bool = True) -> QuantizeResult:
    """The whole offline step: load, calibrate, solve block by block, write atomically."""
    opts.validate()
    src, out = Path(src), Path(out)
    check_output(out, force)
    device = resolve_device(opts.device)
    torch.manual_seed(opts.seed)
    t_start = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with hf_progress(progress):
        model, tok, files = load_source_model(src, device)
    samples = calibration_samples(tok, opts) if opts.method != "rtn" else None
    result = QuantizeResult(out)
    quantized = quantize_blocks(model, samples, opts, device, result, progress)
    specs = {}
    for name in quantized:
        lin = model.get_submodule(name)
        specs[name] = ModuleSpec.create(lin.in_features, lin.out_features, opts.bits, opts.group_size,
                                        linear_dtype=dtype_name(_source_dtype(model)))
    write_checkpoint(src, out, files, quantized, opts, force, base_model=_base_model_name(src, model), specs=specs)
    result.wall_s = time.perf_counter() - t_start
    result.peak_rss_mb = peak_rss_mb()
    if device.type == "cuda":
        result.peak_gpu_mb = torch.cuda.max_memory_allocated() / 2**20
    return result


def _base_model_name(src: Path, model: nn.Module) -> str:
    return getattr(model.config, "_name_or_path", None) or src.name


def format_report(result: QuantizeResult, opts: QuantizeOptions) -> str:
    """The per-layer table and totals printed at the end of `dashq-vllm quantize`."""
    lines = [f"{'layer':<48} {'shape':>12} {'err RTN':>10} {'err ' + opts.method:>10} {'iters':>5}"]
    for r in result.layers:
        lines.append(f"{r.name:<48} {r.shape[0]:>5}x{r.shape[1]:<6} {r.err_rtn:>10.5f} {r.err_method:>10.5f} {r.iters:>5}")
    n = max(len(result.layers), 1)
    mean_rtn = sum(r.err_rtn for r in result.layers) / n
    mean_m = sum(r.err_method for r in result.layers) / n
    lines.append(f"{'mean relative weighted error':<61} {mean_rtn:>10.5f} {mean_m:>10.5f}")
    lines.append(
        f"wrote {result.out_dir}  |  wall {result.wall_s:.1f}s (solver {result.solver_s:.1f}s, "
        f"calibration passes {result.calib_s:.1f}s)  |  peak RSS {result.peak_rss_mb:.0f} MiB"
        + (f", peak GPU {result.peak_gpu_mb:.0f} MiB" if result.peak_gpu_mb else "")
    )
    return "\n".join(lines)
