"""A mixed load of OpenAI-API requests for an OpenAI-compatible server: chat and completions,
streamed and whole, bad bodies, prompts longer than the cache and prompts beyond any limit.
Used by the server's load test (tests/test_server.py) and bench/server_load.py, which times it
against llama-cpp-python's own server.

Every valid prompt starts with its own text, so a request never continues another's cache: the
answer to a request does not depend on which requests came before it."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import socket
import subprocess
import time
import urllib.request
from typing import Any, Dict, List, Optional, Sequence

from .haystack import haystack_text

KINDS = ("chat", "chat-stream", "completion", "completion-stream", "bad-body", "long", "too-long")


@dataclasses.dataclass(frozen=True)
class LoadRequest:
    """One request of the load: ``kind`` is one of :data:`KINDS`; ``body`` the API call's arguments."""

    id: int
    kind: str
    body: Dict[str, Any]


@dataclasses.dataclass
class Outcome:
    """What came back: HTTP ``status`` (200 or the error's), the answer ``text``, ``seconds`` taken."""

    id: int
    kind: str
    status: int
    text: str
    seconds: float
    error: str = ""


def load_requests(n: int, model: str, max_tokens: int = 8, n_long: int = 2, n_ctx: int = 512) -> List[LoadRequest]:
    """``n`` requests cycling through the kinds (``n_long`` of them longer than ``n_ctx`` tokens)."""
    text = haystack_text()
    out: List[LoadRequest] = []
    n_long_made = 0
    cycle = ["chat", "completion", "chat-stream", "completion-stream", "bad-body", "chat", "completion", "too-long"]
    for i in range(n):
        kind = cycle[i % len(cycle)]
        if kind == "completion" and n_long_made < n_long and i % 3 == 0:
            kind = "long"
            n_long_made += 1
        start = 1000 + 1500 * i  # its own text: no request shares a prefix with another
        passage = text[start : start + 600]
        question = "In one short sentence, what is this passage about?"
        base: Dict[str, Any] = {"model": model, "temperature": 0, "max_tokens": max_tokens}
        if kind in ("chat", "chat-stream"):
            body = dict(
                base, messages=[{"role": "user", "content": f"{passage}\n\n{question}"}], stream=kind == "chat-stream"
            )
        elif kind in ("completion", "completion-stream"):
            body = dict(base, prompt=f"{passage}\n\nQ: {question}\nA:", stream=kind == "completion-stream")
        elif kind == "long":  # ~2.5x n_ctx tokens: streamed through the cache
            body = dict(base, prompt=text[start : start + 5 * n_ctx * 4 // 2] + f"\n\nQ: {question}\nA:")
        elif kind == "bad-body":
            body = (
                dict(base, prompt=passage, max_tokens=-5)
                if i % 2
                else dict(base, messages=[{"role": "wizard", "content": passage}])
            )
        else:  # too-long: beyond any limit (9000 words)
            body = dict(base, prompt="Hi " * 9000)
        out.append(LoadRequest(i, kind, body))
    return out


def run_request(client, req: LoadRequest) -> Outcome:
    """Make ``req`` with an ``openai.OpenAI`` client; errors the server answered become their status."""
    import openai

    t0 = time.perf_counter()
    body = dict(req.body)
    try:
        if "messages" in body:
            if body.get("stream"):
                text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**body))
            else:
                text = client.chat.completions.create(**body).choices[0].message.content
        else:
            if body.get("stream"):
                text = "".join(c.choices[0].text for c in client.completions.create(**body))
            else:
                text = client.completions.create(**body).choices[0].text
        return Outcome(req.id, req.kind, 200, text, time.perf_counter() - t0)
    except openai.APIStatusError as e:
        return Outcome(req.id, req.kind, e.status_code, "", time.perf_counter() - t0, str(e)[:200])


def run_load(client, requests: Sequence[LoadRequest], workers: int, timeout: float) -> List[Outcome]:
    """Make ``requests`` from ``workers`` threads at once; TimeoutError if they take over ``timeout`` s."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(run_request, client, r) for r in requests]
        done, pending = concurrent.futures.wait(futures, timeout=timeout)
        if pending:
            for f in pending:
                f.cancel()
            raise TimeoutError(f"{len(pending)} of {len(requests)} requests unanswered after {timeout:g} s")
        return sorted((f.result() for f in done), key=lambda o: o.id)


def resident_bytes(pid: int) -> Optional[int]:
    """Resident memory of process ``pid`` (Linux /proc), or None where it cannot be read."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(argv: Sequence[str], port: int, timeout: float) -> subprocess.Popen:
    """Start ``argv``, an OpenAI-compatible server on 127.0.0.1:``port``, and wait until ``/v1/models`` answers;
    RuntimeError with the end of its stderr if it exits or does not answer within ``timeout`` seconds."""
    proc = subprocess.Popen(list(argv), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2):
                return proc
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"server did not start in {timeout:g} s: {proc.stderr.read()[-2000:]}") from None
            time.sleep(0.5)
