"""Serving acceptance checks against a running OpenAI-compatible server (vLLM), shared by the
slow CPU tests and the GPU acceptance run:

* greedy agreement: the first ``n`` greedy tokens of the served model against our transformers
  reference (``quantize.model_io.load_model``, float32) on fixed prompts; ``agreement`` is the
  matching prefix length summed over prompts over all reference tokens, and
  ``teacher_forced_agreement`` the fraction of served tokens that are the reference's greedy choice
  given the served prefix (what the pass/fail rule uses: one flip at a near-tie, common in a
  degraded 2-bit model, then costs one token instead of the rest of the prompt);
* a two-turn chat, the same streamed (identical replies), a plain completion;
* ``n`` concurrent streamed chats, every one complete (none lost).

    python -m dashq_vllm.serve.check CKPT --launch [--out R.json] [-- VLLM ARGS...]
    python -m dashq_vllm.serve.check CKPT --base-url http://127.0.0.1:8000/v1 [--out R.json]

Exit status 1 when a check fails (teacher-forced agreement below ``--min-agreement``, a lost
stream, ...).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

PROMPTS = ["The capital of France is", "Water boils at a temperature of", "def fibonacci(n):",
           "Once upon a time, in a small village,", "The three primary colors are"]
N_TOKENS = 32


class CheckError(AssertionError):
    """A serving check failed."""


def reference_tokens(model, tok, prompts: list[str] = PROMPTS,
                     n_tokens: int = N_TOKENS) -> tuple[list[list[int]], list[list[int]]]:
    """Prompt ids and greedy continuations (EOS not special) from the float32 transformers reference
    ``model`` (``quantize.model_io.load_model``)."""
    import torch

    device = model.device
    ids_all, outs = [], []
    with torch.no_grad():
        for p in prompts:
            ids = tok(p, return_tensors="pt").input_ids.to(device)
            out = model(ids, use_cache=True)
            toks = []
            for _ in range(n_tokens):
                nxt = out.logits[0, -1].argmax().view(1, 1)
                toks.append(int(nxt))
                out = model(nxt, past_key_values=out.past_key_values, use_cache=True)
            ids_all.append(ids[0].tolist())
            outs.append(toks)
    return ids_all, outs


def teacher_forced_agreement(model, prompt_ids: list[list[int]], got: list[list[int]]) -> float:
    """Fraction of served tokens that are the float32 reference's greedy choice given the *served*
    prefix (one forward pass over prompt + served tokens per prompt). Unlike :func:`agreement`, one
    flip at a near-tie costs one token, not the rest of the prompt; a wrong model still scores low."""
    import torch

    hits = total = 0
    with torch.no_grad():
        for ids, g in zip(prompt_ids, got, strict=True):
            if not g:
                continue
            seq = torch.tensor([ids + g[:-1]], device=model.device)
            pred = model(seq).logits[0, len(ids) - 1:].argmax(-1).tolist()
            hits += sum(int(a == b) for a, b in zip(pred, g))
            total += len(g)
    return hits / max(total, 1)


def agreement(ref: list[list[int]], got: list[list[int]]) -> float:
    """Fraction of reference tokens inside the common prefix of each (reference, served) pair."""
    agree = 0
    for r, g in zip(ref, got, strict=True):
        for a, b in zip(r, g):
            if a != b:
                break
            agree += 1
    return agree / sum(len(r) for r in ref)


def served_tokens(client, model: str, prompt_ids: list[list[int]], n_tokens: int) -> list[list[int]]:
    got = []
    for ids in prompt_ids:
        r = client.completions.create(model=model, prompt=ids, max_tokens=n_tokens, temperature=0,
                                      extra_body={"return_token_ids": True, "ignore_eos": True})
        got.append(list(r.choices[0].token_ids))
    return got


def chat_checks(client, model: str) -> dict:
    """Plain completion, two-turn chat, the same streamed; returns what was measured."""
    from .chat import ChatSession

    r = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8, temperature=0)
    if not (r.choices[0].text.strip() and r.usage.completion_tokens >= 1):
        raise CheckError(f"empty completion: {r}")
    s = ChatSession(client, model, max_tokens=24)
    t1 = s.send("What is the capital of France?")
    t2 = s.send("And of Germany?")
    if not (t1.reply.strip() and t2.reply.strip()):
        raise CheckError(f"empty chat reply: {t1.reply!r} / {t2.reply!r}")
    if t2.prompt_tokens <= t1.prompt_tokens + t1.completion_tokens:
        raise CheckError("the second turn did not carry the first one's history")
    s2 = ChatSession(client, model, max_tokens=24)
    u1 = s2.send("What is the capital of France?", stream=True)
    u2 = s2.send("And of Germany?", stream=True)
    if (u1.reply, u2.reply) != (t1.reply, t2.reply):
        raise CheckError(f"streamed replies differ: {(u1.reply, u2.reply)} vs {(t1.reply, t2.reply)}")
    return {"completion": r.choices[0].text, "reply": t1.reply, "reply_2": t2.reply,
            "chat_tokens_per_s": round(t1.tokens_per_s, 1)}


def concurrent_streams(base_url: str, model: str, n: int, max_tokens: int = 16, timeout: float = 900) -> dict:
    """``n`` streamed chats at once (ignore_eos, so each must yield exactly ``max_tokens``)."""
    from .chat import make_client

    results: dict[int, tuple[int, str | None]] = {}
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            c = make_client(base_url, timeout=timeout)
            usage, finish = None, None
            for ch in c.chat.completions.create(model=model, stream=True, max_tokens=max_tokens, temperature=0,
                                                 messages=[{"role": "user", "content": f"Count to {i + 3}."}],
                                                 stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}):
                usage = ch.usage or usage
                for choice in ch.choices:
                    finish = choice.finish_reason or finish
            results[i] = (usage.completion_tokens if usage else -1, finish)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    wall = time.perf_counter() - t0
    if errors:
        raise CheckError(f"{len(errors)} of {n} streams failed: {errors[:3]}")
    lost = sorted(set(range(n)) - set(results))
    bad = {i: v for i, v in results.items() if v != (max_tokens, "length")}
    if lost or bad:
        raise CheckError(f"streams lost {lost}, incomplete {bad}")
    return {"streams": n, "complete": len(results), "wall_s": round(wall, 2),
            "tokens_per_s": round(n * max_tokens / wall, 1)}


def check_server(base_url: str, ckpt: Path, *, concurrent: int = 0, reference_device: str = "cpu",
                 prompts: list[str] = PROMPTS, n_tokens: int = N_TOKENS) -> dict:
    """Every check against the server at ``base_url`` serving ``ckpt``; returns the measurements."""
    import torch

    from dashq_vllm.quantize.model_io import load_model

    from .chat import default_model, make_client

    client = make_client(base_url, timeout=600)
    model = default_model(client)
    ref_model, tok = load_model(ckpt, reference_device, torch.float32)  # once, for both comparisons
    prompt_ids, ref = reference_tokens(ref_model, tok, prompts, n_tokens)
    got = served_tokens(client, model, prompt_ids, n_tokens)
    tf = teacher_forced_agreement(ref_model, prompt_ids, got)
    del ref_model
    stats: dict = {"model": model, "agreement": round(agreement(ref, got), 4),
                   "teacher_forced_agreement": round(tf, 4),
                   "prompts": len(prompts), "tokens_per_prompt": n_tokens,
                   "reference_tokens": ref, "served_tokens": got}
    stats.update(chat_checks(client, model))
    if concurrent:
        stats["concurrent"] = concurrent_streams(base_url, model, concurrent)
    return stats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Serving acceptance checks of a DASH-Q checkpoint")
    p.add_argument("checkpoint", type=Path)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--base-url", help="an already running server")
    g.add_argument("--launch", action="store_true", help="start `dashq-vllm serve CKPT` here (args after --)")
    p.add_argument("--concurrent", type=int, default=32)
    p.add_argument("--min-agreement", type=float, default=0.9,
                   help="least teacher-forced agreement with the float32 reference (default 0.9)")
    p.add_argument("--reference-device", default="cpu")
    p.add_argument("--ready-timeout", type=float, default=900)
    p.add_argument("--label", help="name of this run in --out (default: the checkpoint's name)")
    p.add_argument("--out", type=Path, help="append the result to this JSON file")
    p.add_argument("--match", metavar="LABEL", help="also require the served greedy tokens to agree with those "
                   "of run LABEL in --out (e.g. tensor parallel 2 against 1), at least --min-agreement")
    argv = list(sys.argv[1:] if argv is None else argv)
    vllm_args = argv[argv.index("--") + 1:] if "--" in argv else []
    opts = p.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    doc = json.loads(opts.out.read_text()) if opts.out and opts.out.is_file() else {}
    if opts.match and "served_tokens" not in doc.get(opts.match, {}):
        p.error(f"--match {opts.match}: no run of that name with served tokens in {opts.out}")
    t0 = time.perf_counter()
    try:
        if opts.launch:
            from .server import ServerProcess

            with ServerProcess(opts.checkpoint, vllm_args=vllm_args, ready_timeout=opts.ready_timeout) as srv:
                startup = time.perf_counter() - t0
                stats = check_server(srv.base_url, opts.checkpoint, concurrent=opts.concurrent,
                                     reference_device=opts.reference_device)
                stats["startup_s"] = round(startup, 1)
                stats["server_log_tail"] = srv.log_tail(1500)
        else:
            stats = check_server(opts.base_url, opts.checkpoint, concurrent=opts.concurrent,
                                 reference_device=opts.reference_device)
        ok = stats["teacher_forced_agreement"] >= opts.min_agreement
        if opts.match:
            m = agreement(doc[opts.match]["served_tokens"], stats["served_tokens"])
            stats["match"] = {"label": opts.match, "agreement": round(m, 4)}
            ok = ok and m >= opts.min_agreement
    except CheckError as e:
        stats, ok = {"error": str(e)}, False
    stats.update(vllm_args=vllm_args, passed=ok)
    print(json.dumps({k: v for k, v in stats.items() if k not in ("server_log_tail", "reference_tokens",
                                                                  "served_tokens")}, indent=1))
    if opts.out:
        doc[opts.label or opts.checkpoint.name] = stats
        opts.out.write_text(json.dumps(doc, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
