"""A small multi-turn chat client for an OpenAI-compatible server (the ``openai`` SDK)."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterable, TextIO


@dataclass
class Turn:
    reply: str
    completion_tokens: int
    prompt_tokens: int
    seconds: float
    first_token_s: float | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds > 0 else float("nan")

    def stats(self) -> str:
        ttft = f", first token {self.first_token_s:.2f}s" if self.first_token_s is not None else ""
        return (f"[{self.completion_tokens} tokens in {self.seconds:.2f}s = {self.tokens_per_s:.1f} tokens/s"
                f"{ttft}; prompt {self.prompt_tokens} tokens]")


def make_client(base_url: str, api_key: str | None = None, timeout: float = 600.0):
    from openai import OpenAI

    return OpenAI(base_url=base_url, api_key=api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY",
                  timeout=timeout, max_retries=0)


def default_model(client) -> str:
    models = client.models.list().data
    if not models:
        raise RuntimeError("the server lists no models")
    return models[0].id


class ChatSession:
    """Keeps the message history; :meth:`send` runs one round trip (streamed or not)."""

    def __init__(self, client, model: str, system: str | None = None, max_tokens: int = 256,
                 temperature: float = 0.0, seed: int | None = 0):
        self.client = client
        self.model = model
        self.system = system
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.seed = seed
        self.messages: list[dict] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def _kwargs(self) -> dict:
        kw = dict(model=self.model, messages=self.messages, max_tokens=self.max_tokens,
                  temperature=self.temperature)
        if self.seed is not None:
            kw["seed"] = self.seed
        return kw

    def send(self, text: str, stream: bool = False, on_delta: Callable[[str], None] | None = None) -> Turn:
        self.messages.append({"role": "user", "content": text})
        t0 = time.perf_counter()
        try:
            if stream:
                turn = self._send_stream(t0, on_delta)
            else:
                r = self.client.chat.completions.create(**self._kwargs())
                reply = r.choices[0].message.content or ""
                usage = r.usage
                turn = Turn(reply, usage.completion_tokens if usage else 0, usage.prompt_tokens if usage else 0,
                            time.perf_counter() - t0)
                if on_delta:
                    on_delta(reply)
        except BaseException:
            self.messages.pop()  # the turn did not happen
            raise
        self.messages.append({"role": "assistant", "content": turn.reply})
        return turn

    def _send_stream(self, t0: float, on_delta) -> Turn:
        pieces: list[str] = []
        first = None
        usage = None
        n_chunks = 0
        resp = self.client.chat.completions.create(**self._kwargs(), stream=True,
                                                   stream_options={"include_usage": True})
        for chunk in resp:
            if getattr(chunk, "usage", None):
                usage = chunk.usage
            for choice in chunk.choices:
                delta = choice.delta.content if choice.delta else None
                if delta:
                    if first is None:
                        first = time.perf_counter() - t0
                    n_chunks += 1
                    pieces.append(delta)
                    if on_delta:
                        on_delta(delta)
        reply = "".join(pieces)
        return Turn(reply, usage.completion_tokens if usage else n_chunks, usage.prompt_tokens if usage else 0,
                    time.perf_counter() - t0, first)


def run_chat(client, model: str, messages: Iterable[str] | None, stream: bool, system: str | None,
             max_tokens: int, temperature: float, out: TextIO = sys.stdout, err: TextIO = sys.stderr,
             stdin: TextIO = sys.stdin) -> list[Turn]:
    """Scripted turns (``messages``) or an interactive loop on ``stdin`` (``/reset``, ``/exit``)."""
    session = ChatSession(client, model, system, max_tokens, temperature)
    turns: list[Turn] = []
    interactive = messages is None

    def inputs():
        if not interactive:
            yield from messages
            return
        print(f"chatting with {model} (/reset clears the history, /exit or Ctrl-D quits)", file=err)
        while True:
            try:
                print("you> ", end="", file=out, flush=True)
                line = stdin.readline()
            except KeyboardInterrupt:
                return
            if not line:
                print(file=out)
                return
            yield line.rstrip("\n")

    for text in inputs():
        if not text.strip():
            continue
        if text.strip() in ("/exit", "/quit"):
            break
        if text.strip() == "/reset":
            session.reset()
            print("(history cleared)", file=err)
            continue
        if not interactive:
            print(f"you> {text}", file=out)
        print("assistant> ", end="", file=out, flush=True)
        turn = session.send(text, stream=stream, on_delta=lambda d: print(d, end="", file=out, flush=True))
        print(file=out)
        print(turn.stats(), file=err, flush=True)
        turns.append(turn)
    return turns
