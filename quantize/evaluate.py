"""Quality evaluation: perplexity on held-out text and lm-eval-style zero-shot accuracy.

Zero-shot scoring follows lm-evaluation-harness (v0.4) conventions, re-implemented here because
lm-eval cannot fetch its datasets offline: each choice is scored by the summed log-probability of
its continuation tokens given the context (the context/continuation split is made as lm-eval's
HFLM does: encode context+continuation, take the tokens past the context's encoding, trailing
spaces of the context moved to the continuation), the continuation being lm-eval's target delimiter
" " followed by the choice; ``acc`` picks the highest sum, ``acc_norm`` the highest sum divided by
the choice's length in characters (without the delimiter). Winogrande uses partial scoring:
the same continuation after each option-filled context.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

DEFAULT_TASKS = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "boolq", "openbookqa")


@torch.no_grad()
def perplexity(model, tok, text: str, seqlen: int = 2048, max_windows: int | None = None,
               progress: bool = True) -> dict:
    """Perplexity over non-overlapping ``seqlen``-token windows of ``text`` (the GPTQ-paper
    protocol); ``max_windows`` limits the amount of text for speed."""
    ids = torch.tensor(tok(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)
    n = ids.numel() // seqlen
    if max_windows:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    t0 = time.perf_counter()
    for i in tqdm(range(n), desc="perplexity", unit="win", disable=not progress):
        x = ids[i * seqlen:(i + 1) * seqlen].unsqueeze(0).to(device)
        logits = model(x, use_cache=False).logits.float()
        loss = F.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum")
        nll += float(loss)
        count += seqlen - 1
    return {"ppl": math.exp(nll / count), "tokens": count, "windows": n, "seqlen": seqlen,
            "seconds": time.perf_counter() - t0}


def split_continuation(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's HFLM._encode_pair: trailing spaces move to the continuation, then the
    continuation tokens are the whole encoding past the context's encoding."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    prefix = [tok.bos_token_id] if _wants_bos(tok) else []
    return prefix + ctx, whole[len(ctx):]


def _wants_bos(tok) -> bool:
    return bool(getattr(tok, "add_bos_token", False)) and tok.bos_token_id is not None


@torch.no_grad()
def loglikelihoods(model, tok, pairs: list[tuple[str, str]]) -> list[float]:
    """Summed log-probability of each continuation given its context, in one padded batch."""
    device = next(model.parameters()).device
    encoded = [split_continuation(tok, c, x) for c, x in pairs]
    seqs = [ctx + cont for ctx, cont in encoded]
    width = max(len(s) for s in seqs)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    batch = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for i, s in enumerate(seqs):
        batch[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    logp = torch.log_softmax(model(batch.to(device), attention_mask=mask.to(device), use_cache=False).logits.float(), -1)
    out = []
    for i, (ctx, cont) in enumerate(encoded):
        pos = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1)
        out.append(float(logp[i, pos, torch.tensor(cont)].sum()))
    return out


TARGET_DELIMITER = " "  # lm-eval's default target_delimiter, always prepended to a choice


def score_doc(model, tok, doc: dict) -> tuple[bool, bool]:
    """(acc, acc_norm) correctness of one task doc."""
    if "contexts" in doc:  # winogrande: partial evaluation
        cont = TARGET_DELIMITER + doc["continuation"]
        lls = loglikelihoods(model, tok, [(c, cont) for c in doc["contexts"]])
        best = max(range(len(lls)), key=lls.__getitem__)
        return best == doc["gold"], best == doc["gold"]
    lls = loglikelihoods(model, tok, [(doc["context"], TARGET_DELIMITER + c) for c in doc["choices"]])
    best = max(range(len(lls)), key=lls.__getitem__)
    norm = [ll / max(len(c), 1) for ll, c in zip(lls, doc["choices"])]  # lm-eval: length without delimiter
    best_norm = max(range(len(norm)), key=norm.__getitem__)
    return best == doc["gold"], best_norm == doc["gold"]


def zero_shot(model, tok, tasks: list[str], limit: int | None = None, progress: bool = True) -> dict:
    from .data import get_task_docs

    results = {}
    for task in tasks:
        docs = get_task_docs(task)
        if limit:
            docs = docs[:limit]
        acc = acc_norm = 0
        for doc in tqdm(docs, desc=task, unit="doc", disable=not progress):
            a, an = score_doc(model, tok, doc)
            acc += a
            acc_norm += an
        n = max(len(docs), 1)
        results[task] = {"acc": acc / n, "acc_norm": acc_norm / n, "n": len(docs),
                         "acc_stderr": math.sqrt(max(acc / n * (1 - acc / n), 0) / max(n - 1, 1))}
    return results
