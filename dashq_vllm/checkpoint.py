"""Reading, validating and atomically writing DASH-Q checkpoint directories.

Metadata and packing rules live in :mod:`dashq_vllm.format`; this module handles the files:
safetensors shards (single file or ``model.safetensors.index.json``), the header-only
validation used before serving, and the write-to-temp-then-rename used by the quantizer so an
interrupted or failed write never leaves a directory that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .format import CONFIG_FILENAME, TENSOR_SUFFIXES, DashQConfig, FormatError, load_dashq_config

INDEX_FILENAME = "model.safetensors.index.json"
_ST_DTYPES = {
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "I32": torch.int32, "I64": torch.int64, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_safetensors_header(path: Path) -> dict[str, dict]:
    """Parse a safetensors header without loading data; detects truncated files."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise FormatError(f"{path.name}: truncated safetensors file (no header)")
            (hlen,) = struct.unpack("<Q", raw)
            if hlen > size - 8:
                raise FormatError(f"{path.name}: truncated safetensors file (header says {hlen} bytes)")
            header = json.loads(f.read(hlen))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{path.name}: unreadable safetensors header ({e})") from None
    header.pop("__metadata__", None)
    data_len = size - 8 - hlen
    end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    if end > data_len:
        raise FormatError(f"{path.name}: truncated safetensors file ({data_len} data bytes, tensors need {end})")
    return header


class CheckpointFiles:
    """The tensors of a checkpoint directory, by name, across shards."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        if not self.dir.is_dir():
            raise FormatError(f"{model_dir}: not a directory")
        index = self.dir / INDEX_FILENAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, KeyError, json.JSONDecodeError) as e:
                raise FormatError(f"{index}: unreadable index ({e})") from None
            shards = sorted(set(weight_map.values()))
            for s in shards:
                if Path(s).name != s or not (self.dir / s).is_file():
                    raise FormatError(f"{INDEX_FILENAME} names missing shard {s!r}")
        else:
            shards = sorted(p.name for p in self.dir.glob("*.safetensors"))
            if not shards:
                raise FormatError(f"{model_dir}: no *.safetensors weights")
        self.headers: dict[str, dict] = {}
        self.location: dict[str, str] = {}
        for s in shards:
            hdr = read_safetensors_header(self.dir / s)
            self.headers[s] = hdr
            for k in hdr:
                self.location[k] = s

    def keys(self) -> set[str]:
        return set(self.location)

    def shape_dtype(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        info = self.headers[self.location[key]][key]
        return tuple(info["shape"]), _ST_DTYPES.get(info["dtype"], torch.uint8)

    def load(self, keys: list[str] | None = None, device: str = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
        wanted = set(self.location) if keys is None else set(keys)
        for shard in self.headers:
            names = [k for k in self.headers[shard] if k in wanted]
            if not names:
                continue
            with safe_open(str(self.dir / shard), framework="pt", device=device) as f:
                for k in names:
                    yield k, f.get_tensor(k)


def validate_checkpoint(model_dir: str | Path) -> tuple[DashQConfig, CheckpointFiles]:
    """Check config files, every quantized tensor's presence, shape and dtype, without loading
    data. Raises FormatError naming the first problem; see :func:`checkpoint_problems` for all."""
    problems, cfg, files = _collect_problems(Path(model_dir))
    if problems:
        raise FormatError(problems[0])
    return cfg, files


def checkpoint_problems(model_dir: str | Path) -> list[str]:
    """Every problem found in a checkpoint, one line each (empty if it is valid)."""
    return _collect_problems(Path(model_dir))[0]


def _collect_problems(d: Path):
    if not d.is_dir():
        return [f"{d}: no such checkpoint directory"], None, None
    if not (d / "config.json").is_file():
        return [f"{d}: config.json is missing"], None, None
    try:
        json.loads((d / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        return [f"{d}/config.json: unreadable ({e})"], None, None
    try:
        cfg = load_dashq_config(d)
        files = CheckpointFiles(d)
    except FormatError as e:
        return [str(e)], None, None
    problems = []
    keys = files.keys()
    for name, spec in cfg.modules.items():
        for suffix in TENSOR_SUFFIXES:
            key = f"{name}.{suffix}"
            if key not in keys:
                problems.append(f"missing tensor {key}")
                continue
            try:
                spec.check_tensor(name, suffix, *files.shape_dtype(key))
            except FormatError as e:
                problems.append(str(e))
        if f"{name}.weight" in keys:
            problems.append(f"{name}: has both a dense .weight and DASH-Q tensors")
    return problems, cfg, files


# --------------------------------------------------------------------------- writing


def save_tensors_sharded(tensors: dict[str, torch.Tensor], out_dir: Path, max_shard_bytes: int) -> list[str]:
    """Write safetensors, one file when it fits in ``max_shard_bytes`` else HF-style shards with
    an index. Returns the file names written."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t.contiguous()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        save_file(shard, str(out_dir / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out_dir / INDEX_FILENAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return names + [INDEX_FILENAME]


@contextmanager
def atomic_output_dir(dst: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to ``dst``; on success it replaces ``dst`` in one rename.

    On any exception (including KeyboardInterrupt and a full disk) the temporary directory is
    removed and ``dst`` is left as it was."""
    dst = Path(dst).absolute()
    if dst.exists() and not force:
        raise FileExistsError(f"{dst} already exists; pass --force to overwrite it")
    parent = dst.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PermissionError(f"cannot create {parent}: {e.strerror}") from None
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"{parent} is not writable")
    tmp = parent / f".{dst.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if dst.exists():
            old = parent / f".{dst.name}.old-{os.getpid()}"
            os.replace(dst, old)
        os.replace(tmp, dst)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def is_dashq_checkpoint(model_dir: str | Path) -> bool:
    return (Path(model_dir) / CONFIG_FILENAME).is_file()
