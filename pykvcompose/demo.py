"""``python -m pykvcompose demo``: one long prompt, answered with the full cache and with KVCompose."""

from __future__ import annotations

import functools
import random
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import llama_cpp

from .llama import Llama
from .presses import KVComposePress

MIB = 1024 * 1024


# ---- the demo's document: offline haystack text with a planted pass key --------------------------
PASSKEY_QUESTION = "What is the pass key? The pass key is"


def haystack_text() -> str:
    """About 465k characters of Python documentation shipped with CPython (``pydoc_data.topics``)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k].strip() for k in sorted(topics))


@functools.lru_cache(maxsize=1)
def paragraphs() -> Tuple[str, ...]:
    """The haystack's non-empty paragraphs, in order."""
    return tuple(p for p in haystack_text().split("\n\n") if p.strip())


def take_paragraphs(tokenize: Callable[[str], List[int]], n_tokens: int, start: int) -> List[str]:
    """Consecutive paragraphs from index ``start`` (wrapping around) totalling at most ``n_tokens`` tokens,
    counting one token for each paragraph break."""
    every = paragraphs()
    chosen: List[str] = []
    used = 0
    for p in every[start:] + every[:start]:
        cost = len(tokenize(p)) + 1
        if used + cost > n_tokens:
            break
        chosen.append(p)
        used += cost
    return chosen


def passkey_prompt(
    tokenize: Callable[[str], List[int]], n_tokens: int, depth: float, passkey: int, seed: int = 0
) -> str:
    """A ``n_tokens``-ish haystack with a pass key planted at relative ``depth`` (0 = start, 1 = end).

    ``tokenize`` maps text to tokens (e.g. ``lambda s: llm.tokenize(s.encode())``); the haystack
    is cut at a paragraph boundary chosen by ``seed`` so that different seeds read different text.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    start = random.Random(seed).randrange(len(paragraphs()) // 2)
    needle = f"The pass key is {passkey}. Remember it. {passkey} is the pass key."
    intro = "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it.\n\n"
    budget = n_tokens - len(tokenize(intro + needle + "\n\n" + PASSKEY_QUESTION)) - 8
    chosen = take_paragraphs(tokenize, budget, start)
    at = round(depth * len(chosen))
    body = chosen[:at] + [needle] + chosen[at:]
    return intro + "\n\n".join(body) + "\n\n" + PASSKEY_QUESTION


def _progress(msg: str, quiet: bool) -> None:
    if not quiet:
        print(f"[pykvcompose] {msg}", file=sys.stderr, flush=True)


def answer(
    llm: Llama, prompt_tokens: List[int], max_tokens: int, stop: Optional[Callable[[str], bool]] = None
) -> Dict[str, Any]:
    """Greedy answer with timings: prompt processing (prefill + compression) and decode speed.

    ``stop(text)``: end the answer once it returns True for the text so far. A streamed prompt that ends near a
    full cache probes its last unranked cells before the second token (``kv_stream_seconds["probe"]``): that
    time is returned apart (``late_probe_seconds``), not counted as decoding.
    """
    t0 = time.perf_counter()
    out: List[int] = []
    t_first = None
    at_first: Dict[str, float] = {}
    for tok in llm.generate(prompt_tokens, temp=0.0, top_k=1):
        if t_first is None:
            t_first = time.perf_counter()
            at_first = dict(getattr(llm, "kv_stream_seconds", {}))
        if llama_cpp.llama_vocab_is_eog(llm._model.vocab, tok):
            break
        out.append(tok)
        if len(out) >= max_tokens:
            break
        if stop is not None and stop(llm.detokenize(out).decode("utf-8", errors="replace")):
            break
    t_end = time.perf_counter()
    decoded = max(0, len(out) - 1)
    late = getattr(llm, "kv_stream_seconds", {}).get("probe", 0.0) - at_first.get("probe", 0.0) if t_first else 0.0
    return {
        "text": llm.detokenize(out).decode("utf-8", errors="replace"),
        "prompt_seconds": (t_first or t_end) - t0,
        "decode_tok_s": decoded / (t_end - t_first - late) if t_first and decoded else float("nan"),
        "late_probe_seconds": late,
        "stream_seconds_at_first_token": at_first,
    }


def run_demo(
    n_tokens: int = 3000,
    ratios: Sequence[float] = (0.5, 0.75),
    depth: float = 0.4,
    passkey: int = 73918,
    model_path: Optional[str] = None,
    quiet: bool = False,
    stream_ctx: Optional[int] = None,
    published_ratios: Sequence[float] = (0.75,),
) -> List[Dict[str, Any]]:
    """The demo's rows: the document answered with the full cache, compressed whole at each ratio by
    ``KVComposePress(ratio)`` (the default: its lookahead probe) and at each of ``published_ratios`` by
    KVCompose as published (``scoring="reconstruct"``), and (``stream_ctx`` cells, default a third of the
    document) streamed through a cache that small."""
    _progress("loading the embedded model (SmolLM2-135M-Instruct, Q4_1)", quiet)
    llm = Llama(model_path, n_ctx=2 * n_tokens + 512, n_batch=512, verbose=False)
    prompt = passkey_prompt(lambda s: llm.tokenize(s.encode(), add_bos=False), n_tokens, depth, passkey)
    tokens = llm.tokenize(prompt.encode())
    _progress(f"document of {len(tokens)} tokens, pass key {passkey} planted at {depth:.0%} depth", quiet)
    rows = []
    runs = [(None, "auto")] + [(r, "auto") for r in ratios] + [(r, "reconstruct") for r in published_ratios]
    for ratio, scoring in runs:
        name = (
            "full cache"
            if ratio is None
            else f"KVCompose {ratio}" + (", as published" if scoring == "reconstruct" else "")
        )
        llm.kv_compress = None if ratio is None else KVComposePress(compression_ratio=ratio, scoring=scoring)
        llm.reset()
        _progress(
            f"{name}: prefill"
            + ("" if ratio is None else f", {llm.kv_compress.probe().kind} probe, compose")
            + ", answer",
            quiet,
        )
        t0 = time.perf_counter()
        res = answer(llm, tokens, max_tokens=12)
        if ratio is None:
            cells = len(tokens)
            prefill, compress = res["prompt_seconds"], 0.0
        else:
            st = llm.kv_stats
            cells = st["cells_after"] + 1  # + the held-back last prompt token
            prefill, compress = st["prefill_seconds"], st["compress_seconds"]
        rows.append(_row(name, llm, res, cells, prefill, compress, passkey, t0))
    llm.close()
    stream_ctx = stream_ctx if stream_ctx is not None else max(256, len(tokens) // 3 // 64 * 64)
    if 0 < stream_ctx < len(tokens):
        rows.append(_streamed_row(model_path, tokens, stream_ctx, passkey, quiet))
    return rows


def _streamed_row(
    model_path: Optional[str], tokens: List[int], n_ctx: int, passkey: int, quiet: bool
) -> Dict[str, Any]:
    """The document read through a cache of ``n_ctx`` cells (``kv_room="fill"``): llama.cpp allocates
    those cells once, and KVCompose keeps the best of what streamed past them."""
    press = KVComposePress(compression_ratio=0.75)
    _progress(
        f"KVCompose streamed: the document through n_ctx={n_ctx} ({len(tokens) / n_ctx:.1f}x smaller "
        "than the document), each compression ranked by the question, answer",
        quiet,
    )
    llm = Llama(model_path, n_ctx=n_ctx, n_batch=512, verbose=False, kv_compress=press, kv_room="fill")
    try:
        t0 = time.perf_counter()
        res = answer(llm, tokens, max_tokens=12)
        # the prompt's chunks until the first token (later decodes are timed as "prefill" too), and every
        # compression and probe the prompt cost, the one before the second token included
        prefill = res["stream_seconds_at_first_token"]["prefill"]
        compress = res["prompt_seconds"] - prefill + res["late_probe_seconds"]
        # cells: n_ctx, allocated up front: the memory this run takes, whatever it holds
        return _row(f"KVCompose streamed, n_ctx={n_ctx}", llm, res, n_ctx, prefill, compress, passkey, t0)
    finally:
        llm.close()


def _row(
    method: str, llm: Llama, res: Dict[str, Any], cells: int, prefill: float, compress: float, passkey: int, t0: float
) -> Dict[str, Any]:
    """One demo table row from an ``answer`` result (``t0``: when the method started)."""
    return {
        "method": method,
        "cells": cells,
        "kv_mib": _kv_bytes_per_cell(llm) * cells / MIB,
        "prefill_s": prefill,
        "compress_s": compress,
        "decode_tok_s": res["decode_tok_s"],
        "answer": res["text"].strip().splitlines()[0] if res["text"].strip() else "",
        "correct": str(passkey) in res["text"],
        "seconds": time.perf_counter() - t0,
    }


def _kv_bytes_per_cell(llm: Llama) -> float:
    from . import _native

    info = _native.context_state_info(llm._ctx.ctx)
    return info["kv_bytes"] / info["n_cells"]


def format_table(rows: List[Dict[str, Any]]) -> str:
    head = "| method | cells | KV MiB | prefill s | compress s | decode tok/s | answer | correct |"
    sep = "|---|---:|---:|---:|---:|---:|---|---|"
    lines = [head, sep]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['cells']} | {r['kv_mib']:.1f} | {r['prefill_s']:.2f} | {r['compress_s']:.2f} | "
            f"{r['decode_tok_s']:.1f} | {r['answer'][:40]} | {'yes' if r['correct'] else 'no'} |"
        )
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="pykvcompose demo", description=__doc__)
    p.add_argument("--tokens", type=int, default=3000, help="document length in tokens (default 3000)")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.75], help="compression ratios")
    p.add_argument(
        "--published-ratios",
        type=float,
        nargs="*",
        default=[0.75],
        help='ratios of the rows compressed by KVCompose as published (scoring="reconstruct"; none: no such row)',
    )
    p.add_argument("--depth", type=float, default=0.4, help="relative depth of the planted fact")
    p.add_argument(
        "--stream-ctx",
        type=int,
        default=None,
        help="cache size of the streamed row (default: a third of the document; 0: no streamed row)",
    )
    p.add_argument("--model", default=None, help="GGUF file (default: the embedded SmolLM2)")
    p.add_argument("--quiet", action="store_true", help="no progress messages")
    a = p.parse_args(argv)
    rows = run_demo(
        a.tokens,
        a.ratios,
        a.depth,
        model_path=a.model,
        quiet=a.quiet,
        stream_ctx=a.stream_ctx,
        published_ratios=a.published_ratios,
    )
    print(format_table(rows))
    streamed = [r for r in rows if "streamed" in r["method"]]
    if streamed:
        print(
            "\nThe streamed row's cells and KV MiB are what llama.cpp allocated for the whole run "
            f"({streamed[0]['cells']} cells); the full cache needed {rows[0]['cells']} cells "
            f"({rows[0]['kv_mib']:.1f} MiB) for the same document."
        )
    return 0
