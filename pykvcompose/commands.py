"""``pykvcompose run``, ``chat`` and ``serve``: compressed llama.cpp from the command line."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import pathlib
import sys
from typing import Any, Dict, List, Sequence

from .presses import DecodingPress, PrefillDecodingPress, SnapKVPress, parse_press_spec
from .progress import Progress

MIB = 1024 * 1024


class CommandError(Exception):
    """A problem with the command line or its inputs: printed as ``pykvcompose CMD: error: ...``, exit status 2."""


def add_model_options(p: argparse.ArgumentParser, default_press: str = "kvcompose:0.5") -> None:
    p.add_argument("--model", help="GGUF file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--n-ctx", type=int, default=2048, help="cells of the KV cache (default 2048)")
    p.add_argument(
        "--kv-compress",
        default=default_press,
        metavar="NAME:RATIO[,key=value...]",
        help=f"the press, e.g. kvcompose:0.75 or snapkv:0.5,window_size=32; 'none' for no compression "
        f"(default {default_press})",
    )
    p.add_argument(
        "--kv-room",
        choices=("fill", "ratio"),
        default="fill",
        help="how a full cache makes room: 'fill' frees one chunk and keeps the best cells of all that "
        "streamed past (default); 'ratio' compresses it to the press's ratio, re-scored by the "
        "newest tokens",
    )
    p.add_argument(
        "--decode-target",
        type=int,
        metavar="CELLS",
        help="also compress while generating, back to CELLS cells (a DecodingPress)",
    )
    p.add_argument(
        "--decode-interval",
        type=int,
        default=512,
        metavar="TOKENS",
        help="generated tokens between two such compressions (default 512)",
    )
    p.add_argument("--threads", type=int, help="CPU threads (default: the cores this process may use)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or statistics: only the answer")


def add_answer_options(p: argparse.ArgumentParser, max_tokens: int, temperature: float) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens, help=f"answer length limit (default {max_tokens})")
    p.add_argument(
        "--temperature",
        type=float,
        default=temperature,
        help=f"sampling temperature (default {temperature:g}{': greedy' if temperature == 0 else ''})",
    )


def press_from_args(a: argparse.Namespace):
    """The press the options describe (None for ``--kv-compress none``)."""
    try:
        press = None if a.kv_compress.strip().lower() == "none" else parse_press_spec(a.kv_compress)
        if a.decode_target is None:
            return press
        base = dataclasses.replace(press, compression_ratio=0.0) if press is not None else SnapKVPress()
        decoding = DecodingPress(base, compression_interval=a.decode_interval, target_size=a.decode_target)
        return decoding if press is None else PrefillDecodingPress(press, decoding)
    except ValueError as e:
        raise CommandError(f"--kv-compress: {e}") from None


def check_options(a: argparse.Namespace) -> None:
    """Refuse out-of-range numbers before any model is loaded."""
    for name, low in (("n_ctx", 16), ("threads", 1), ("max_tokens", 1), ("port", 1)):
        value = getattr(a, name, None)
        if value is not None and value < low:
            raise CommandError(f"--{name.replace('_', '-')} must be at least {low}, got {value}")
    if getattr(a, "temperature", 0.0) < 0:
        raise CommandError(f"--temperature must be >= 0, got {a.temperature}")


def make_llm(a: argparse.Namespace, **kwargs: Any):
    """A Llama for the options, with a prefill progress bar unless ``--quiet``."""
    from .llama import Llama

    check_options(a)
    if a.model is not None and not os.path.isfile(a.model):
        raise CommandError(f"--model: no such file {a.model!r}")
    press = press_from_args(a)
    try:
        return Llama(
            a.model,
            n_ctx=a.n_ctx,
            n_threads=a.threads,
            kv_compress=press,
            verbose=False,
            kv_room=a.kv_room,
            kv_progress=None if a.quiet else prefill_progress(),
            **kwargs,
        )
    except (ValueError, NotImplementedError) as e:
        raise CommandError(str(e)) from None


def prefill_progress():
    """A ``kv_progress`` callback drawing a bar for prompts of more than one batch."""
    state: Dict[str, Progress] = {}
    labels = {"prefill": "prompt tokens prefilled", "probe": "prompt tokens probed (KVCompose reconstruct pass)"}

    def report(done: int, total: int, stage: str) -> None:
        bar = state.get("bar")
        if bar is None or bar.total != total or done < bar.done or state.get("stage") != stage:
            bar = state["bar"] = Progress(total, quiet=total <= done)  # one batch: nothing to show
            state["stage"] = stage
        bar.update(done, labels.get(stage, stage))

    return report


def memory_line(llm) -> str:
    m = llm.kv_memory()
    saved = 1 - m["kv_bytes"] / m["kv_bytes_uncompressed"] if m["kv_bytes_uncompressed"] else 0.0
    return (
        f"[cache: {m['cells']}/{m['n_ctx']} cells for {m['tokens']} tokens, KV {m['kv_bytes'] / MIB:.1f} MiB "
        f"instead of {m['kv_bytes_uncompressed'] / MIB:.1f} MiB (saved {saved:.0%}), "
        f"{llm.kv_compressions} compressions to make room]"
    )


def _stream(llm, messages: List[Dict[str, str]], a: argparse.Namespace, out=sys.stdout) -> str:
    """Stream a chat answer to ``out``; returns its text."""
    parts = []
    for chunk in llm.create_chat_completion(messages, max_tokens=a.max_tokens, temperature=a.temperature, stream=True):
        text = chunk["choices"][0]["delta"].get("content") or ""
        parts.append(text)
        out.write(text)
        out.flush()
    out.write("\n")
    return "".join(parts)


# ---- pykvcompose run ----------------------------------------------------------------------------
def run_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="pykvcompose run", description="Answer a question about a document, however long, with a compressed cache."
    )
    p.add_argument("--file", required=True, help="the document (UTF-8 text)")
    p.add_argument("--question", required=True, help="the question asked after it")
    add_answer_options(p, max_tokens=256, temperature=0.0)
    add_model_options(p)
    a = p.parse_args(argv)
    return _guard("run", lambda: _run(a))


def _run(a: argparse.Namespace) -> int:
    try:
        document = pathlib.Path(a.file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CommandError(f"cannot read --file {a.file}: {e}") from None
    if not a.question.strip():
        raise CommandError("--question is empty")
    llm = make_llm(a)
    try:
        _stream(llm, [{"role": "user", "content": f"{document}\n\n{a.question}"}], a)
        if not a.quiet:
            print(memory_line(llm), file=sys.stderr)
    finally:
        llm.close()
    return 0


# ---- pykvcompose chat ---------------------------------------------------------------------------
CHAT_HELP = """commands: /save PATH (keep this conversation), /load PATH, /reset, /stats, /quit
a line starting with @ reads a file into the message: @notes.txt what changed?"""


def chat_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="pykvcompose chat", description="Chat on a compressed cache. " + CHAT_HELP)
    p.add_argument("--session", help="a session file: continued if it exists, written on exit")
    p.add_argument("--system", help="a system message")
    add_answer_options(p, max_tokens=512, temperature=0.7)
    add_model_options(p)
    a = p.parse_args(argv)
    return _guard("chat", lambda: _chat(a))


def _chat(a: argparse.Namespace) -> int:
    from .session import SessionError

    llm = make_llm(a)
    messages: List[Dict[str, str]] = [{"role": "system", "content": a.system}] if a.system else []
    if a.session and os.path.exists(a.session):
        llm.load_session(a.session)
        messages = list(llm.kv_session_metadata.get("messages", messages))
        _note(a, f"continuing {a.session}: {len(messages)} messages, {llm.n_tokens} tokens")
    _note(a, CHAT_HELP)
    interactive = sys.stdin.isatty()
    try:
        while True:
            if interactive:
                print("> ", end="", flush=True)
            line = sys.stdin.readline()
            if not line:
                break
            line = line.strip()
            if not line:
                continue
            cmd, _, arg = line.partition(" ")
            if cmd in ("/quit", "/exit"):
                break
            if cmd == "/reset":
                llm.reset()
                messages = messages[:1] if a.system else []
                _note(a, "conversation cleared")
            elif cmd == "/stats":
                print(memory_line(llm), file=sys.stderr)
            elif cmd == "/save":
                if not arg:
                    print("usage: /save PATH", file=sys.stderr)
                    continue
                info = llm.save_session(arg, metadata={"messages": messages})
                _note(a, f"saved {info['file_bytes'] / MIB:.2f} MiB to {arg}", force=True)
            elif cmd == "/load":
                try:
                    llm.load_session(arg)
                    messages = list(llm.kv_session_metadata.get("messages", []))
                    _note(a, f"loaded {arg}: {len(messages)} messages", force=True)
                except SessionError as e:
                    print(f"error: {e}", file=sys.stderr)
            elif cmd.startswith("/"):
                print(f"unknown command {cmd}; {CHAT_HELP}", file=sys.stderr)
            else:
                if line.startswith("@"):
                    name, _, rest = line[1:].partition(" ")
                    try:
                        line = pathlib.Path(name).read_text(encoding="utf-8") + ("\n\n" + rest if rest else "")
                    except (OSError, UnicodeDecodeError) as e:
                        print(f"error: cannot read {name}: {e}", file=sys.stderr)
                        continue
                messages.append({"role": "user", "content": line})
                try:
                    messages.append({"role": "assistant", "content": _stream(llm, messages, a)})
                except ValueError as e:  # e.g. a conversation past kv_max_tokens
                    messages.pop()
                    print(f"error: {e}", file=sys.stderr)
                    continue
                if not a.quiet:
                    print(memory_line(llm), file=sys.stderr)
    finally:
        if a.session:
            llm.save_session(a.session, metadata={"messages": messages})
            _note(a, f"conversation saved to {a.session}")
        llm.close()
    return 0


def _note(a: argparse.Namespace, text: str, force: bool = False) -> None:
    if force or not a.quiet:
        print(text, file=sys.stderr)


# ---- pykvcompose serve --------------------------------------------------------------------------
def serve_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="pykvcompose serve", description="An OpenAI-compatible server (llama-cpp-python's) on a compressed cache."
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--model-alias", help="the model name clients use (default: the file name)")
    p.add_argument(
        "--logits-all",
        action="store_true",
        help="keep every token's logits so that requests may ask for logprobs; this keeps one row of "
        "logits per cache cell, so prompts and answers then stop at --n-ctx tokens",
    )
    p.add_argument(
        "--interrupt-requests",
        action="store_true",
        help="cut a streamed answer short when another request arrives (llama-cpp-python's default); "
        "without it, concurrent requests wait their turn and every answer is whole",
    )
    add_model_options(p)
    a = p.parse_args(argv)
    return _guard("serve", lambda: _serve(a))


def create_app(a: argparse.Namespace):
    """llama-cpp-python's FastAPI app serving our Llama, plus ``GET /v1/kv/stats``."""
    try:
        from fastapi import Depends
        from llama_cpp.server import app as server_app
        from llama_cpp.server import model as server_model
        from llama_cpp.server.settings import ModelSettings, ServerSettings
    except ImportError as e:
        raise CommandError(f"the server needs the [server] extra: pip install 'pykvcompose[server]' ({e})") from None
    from .llama import Llama
    from .models import default_model_path
    from .session import press_to_dict
    from .support import default_threads

    check_options(a)
    press = press_from_args(a)
    model = a.model or default_model_path()
    if not os.path.isfile(model):
        raise CommandError(f"--model: no such file {model!r}")
    factory = functools.partial(Llama, kv_compress=press)

    class CompressedLlamaProxy(server_model.LlamaProxy):
        @staticmethod
        def load_llama_from_model_settings(settings):
            # llama-cpp-python maps its many settings onto ``llama_cpp.Llama(...)``, looked up when
            # called: point that name at our Llama for the duration, so every setting still applies
            original = server_model.llama_cpp.Llama
            server_model.llama_cpp.Llama = factory
            try:
                return server_model.LlamaProxy.load_llama_from_model_settings(settings)
            finally:
                server_model.llama_cpp.Llama = original

    settings = ModelSettings(
        model=model,
        model_alias=a.model_alias or os.path.basename(model),
        n_ctx=a.n_ctx,
        n_threads=a.threads or default_threads(),
        n_threads_batch=a.threads or default_threads(),
        logits_all=a.logits_all,
        verbose=False,
    )
    server_app.LlamaProxy = CompressedLlamaProxy  # create_app builds its proxy from this name
    try:
        server_settings = ServerSettings(host=a.host, port=a.port, interrupt_requests=a.interrupt_requests)
        app = server_app.create_app(server_settings=server_settings, model_settings=[settings])
    except (ValueError, NotImplementedError) as e:
        raise CommandError(str(e)) from None
    finally:
        server_app.LlamaProxy = server_model.LlamaProxy

    _client_errors_as_4xx()

    @app.get("/v1/kv/stats")
    def kv_stats(llama_proxy=Depends(server_app.get_llama_proxy)):
        llm = llama_proxy()
        last = {k: v for k, v in llm.kv_stats.items() if isinstance(v, (int, float, str, bool, list, type(None)))}
        return {
            "press": press_to_dict(llm.kv_compress),
            "memory": llm.kv_memory(),
            "compressions": llm.kv_compressions,
            "last_compression": last,
        }

    return app


def _client_errors_as_4xx() -> None:
    """Answer a request body the API's models reject with 422 and a request the model refuses
    (ValueError: bad input) with 400, naming the field. llama-cpp-python's routes turn every
    exception into 500 "internal_server_error"; its own mappings (context length) still come first."""
    from fastapi.exceptions import RequestValidationError
    from llama_cpp.server.errors import ErrorResponse, RouteErrorHandler

    def wrap(original):
        def error_message_wrapper(self, error, body=None):
            if isinstance(error, RequestValidationError):
                problems = error.errors()
                fields = [".".join(str(x) for x in e.get("loc", ()) if x != "body") for e in problems]
                message = "; ".join(f"{f or 'body'}: {e.get('msg', 'invalid')}" for f, e in zip(fields, problems))
                return 422, ErrorResponse(
                    message=message, type="invalid_request_error", param=fields[0] if fields else None, code=None
                )
            status, response = original(self, error, body)
            if status == 500 and isinstance(error, (ValueError, TypeError)):
                return 400, ErrorResponse(message=str(error), type="invalid_request_error", param=None, code=None)
            return status, response

        return error_message_wrapper

    # FastAPI copies included routes lazily, so the class is patched (once; this process serves)
    if not getattr(RouteErrorHandler.error_message_wrapper, "_pykvcompose", False):
        patched = wrap(RouteErrorHandler.error_message_wrapper)
        patched._pykvcompose = True
        RouteErrorHandler.error_message_wrapper = patched


def _serve(a: argparse.Namespace) -> int:
    app = create_app(a)  # refuses a bad press, model or missing [server] extra first
    import uvicorn

    if not a.quiet:
        print(f"pykvcompose serve: http://{a.host}:{a.port}/v1 (OpenAI API), stats at /v1/kv/stats", file=sys.stderr)
    uvicorn.run(app, host=a.host, port=a.port, log_level="warning" if a.quiet else "info")
    return 0


def _guard(name: str, run) -> int:
    """Run a command; its input errors become one line on stderr and exit status 2."""
    from .session import SessionError

    try:
        return run()
    except (CommandError, SessionError, ValueError) as e:
        print(f"pykvcompose {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
