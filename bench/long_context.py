"""Pass-key retrieval vs depth in documents several times longer than the cache, in one run.

    python bench/long_context.py [--tokens 7000] [--n-ctx 2048] [--depths 0.1 0.3 0.5 0.7 0.9 | --cases 10]
                                 [--rooms ratio fill] [--style completion chat] [--single-shot]

The document is prefilled in chunks and the cache compressed by the press whenever the next chunk
would not fit (``Llama(n_ctx=2048, kv_compress=..., kv_room=...)``), once per ``--rooms`` entry; the
reference is the full cache (``n_ctx`` large enough for the whole document) and, with
``--single-shot``, KVCompose compressing the whole document at once to ``n_ctx - 1`` cells. Every row
reports its count with a Wilson 95% interval and an exact McNemar test against single-shot and full
cache on the same cases, per depth band, and how many of the needle's tokens each (layer, kv head)
still holds at the end; one case traces that after every compression. Writes ``results.md``,
``results.json``, ``needle_vs_depth.png`` and ``needle_per_head.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import numpy as np

from kvbench.haystack import passkey_cases, passkey_chat_prompt, passkey_positions, share_kept
from kvbench.stats import count_with_interval, mcnemar_exact
from pykvcompose import KVComposePress, Llama, StreamPolicy, compression
from pykvcompose.compression import compress
from pykvcompose.demo import answer
from pykvcompose.presses import parse_press_spec

PRESSES = ["kvcompose:0.5", "kvcompose:0.75", "snapkv:0.5", "streaming_llm:0.5"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=7000)
    p.add_argument("--n-ctx", type=int, default=2048)
    p.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    p.add_argument("--cases", type=int, help="N cases at depths spread evenly over 0.05-0.95 (instead of --depths)")
    p.add_argument(
        "--first-case",
        type=int,
        default=0,
        help="number the cases from here: another set of keys and haystack text at the same depths",
    )
    p.add_argument(
        "--presses",
        nargs="*",
        default=PRESSES,
        help="press specs NAME:RATIO[,key=value...][@ROOM] (@ROOM: only with that kv_room); none: only the "
        "full cache and --single-shot",
    )
    p.add_argument("--rooms", nargs="+", default=["ratio"], choices=["ratio", "fill"])
    p.add_argument("--chunk", type=int, help="kv_chunk for kv_room=fill")
    p.add_argument(
        "--question-consensus",
        type=float,
        default=1.0,
        help="StreamPolicy.question_consensus (0: each head's own ranking of the question-ranked rounds)",
    )
    p.add_argument(
        "--question-every",
        type=int,
        default=StreamPolicy.question_every,
        help="StreamPolicy.question_every (1: the question's probe at every question-ranked compression)",
    )
    p.add_argument(
        "--question-drafts",
        type=int,
        default=StreamPolicy.question_drafts,
        help="StreamPolicy.question_drafts (the most drafts each question-ranked round decodes)",
    )
    p.add_argument(
        "--style",
        nargs="+",
        default=["completion"],
        choices=["completion", "chat"],
        help="chat: the document and question inside SmolLM2's chat template",
    )
    p.add_argument("--single-shot", action="store_true", help="also KVCompose on the whole document at once")
    p.add_argument(
        "--trace-depth",
        type=float,
        default=0.3,
        help="the case nearest this depth records the needle kept per (layer, head) after each compression",
    )
    p.add_argument("--no-full", action="store_true", help="skip the full-cache reference (quick comparisons)")
    p.add_argument("--flash", choices=["off", "on"], default="off", help="flash attention (every Llama of the run)")
    p.add_argument("--max-tokens", type=int, default=20)
    p.add_argument("--out", default="bench/runs/long")
    a = p.parse_args()
    # refuse a bad spec before any work; "spec@room" runs that press with one room only
    presses = []  # (spec without its room, press, the only room it runs with or None)
    for spec in a.presses:
        name, _, only = spec.partition("@")
        presses.append((name, parse_press_spec(name), only or None))
    if any(only not in (None, "ratio", "fill") for _, _, only in presses):
        p.error("a press spec's @ROOM must be @ratio or @fill")
    depths = list(np.round(np.linspace(0.05, 0.95, a.cases), 3)) if a.cases else a.depths
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    full_n_ctx = 2 * a.tokens + 512 if a.single_shot else a.tokens + 256  # single-shot's lookahead probe needs 2n
    flash = a.flash == "on"
    full = Llama(n_ctx=full_n_ctx, n_batch=512, flash_attn=flash, verbose=False)
    tok = lambda s: full.tokenize(s.encode(), add_bos=False)  # noqa: E731
    cases = []  # (style, depth, key, prompt tokens, needle positions)
    for style in a.style:
        for depth, key, prompt in passkey_cases(tok, a.tokens, depths, a.first_case):
            if style == "chat":
                prompt = passkey_chat_prompt(full, prompt)
            # special=True: the chat template's markers are its special tokens, not their spelling as text
            toks = full.tokenize(prompt.encode(), special=style == "chat")
            cases.append((style, depth, key, toks, passkey_positions(tok, toks, key)))
    traced_depth = min(depths, key=lambda d: abs(d - a.trace_depth))
    rows, traces = {}, {}
    trace: list = []  # needle kept per (layer, kv head) after each compression of the traced case
    t0 = time.perf_counter()

    def traced_compress(engine, *args, **kwargs):
        stats = compress(engine, *args, **kwargs)
        if tracing_needle is not None:
            trace.append(share_kept(engine.conv.selection, tracing_needle).tolist())
        return stats

    compression.compress = traced_compress  # (streaming calls it through the module too)
    tracing_needle = None

    def record(name, llm, case):
        nonlocal tracing_needle
        style, depth, key, toks, needle = case
        llm.kv_selection = None  # set again only if this run compresses
        trace.clear()
        tracing_needle = needle if depth == traced_depth else None
        res = answer(llm, toks, a.max_tokens)
        if tracing_needle is not None:
            traces[f"{style}: {name}"] = list(trace)
        tracing_needle = None
        m = llm.kv_memory()
        heads = None if llm.kv_selection is None else share_kept(llm.kv_selection, needle)
        kept = 1.0 if heads is None else float(heads.mean())
        rows.setdefault(f"{style}: {name}", []).append(
            {
                "depth": depth,
                "tokens": len(toks),
                "found": str(key) in res["text"],
                "answer": res["text"].strip()[:40],
                "cells": m["cells"],
                "compressions": llm.kv_compressions,
                "prompt_seconds": res["prompt_seconds"],
                "needle_kept": kept,
                "stream_seconds": dict(llm.kv_stream_seconds),
            }
        )
        r = rows[f"{style}: {name}"][-1]
        print(
            f"{style:10s} {name:40s} depth {depth:.2f}: {'found' if r['found'] else 'missed':6s} {r['answer']!r:44s} "
            f"cells {r['cells']:5d} compressions {r['compressions']:2d} needle kept {kept:.2f} "
            f"prompt {r['prompt_seconds']:.0f}s (chunks {r['stream_seconds']['prefill']:.1f}s, their probes "
            f"{r['stream_seconds']['probe']:.1f}s) | {time.perf_counter() - t0:.0f}s",
            flush=True,
        )

    def write_results():
        """results.json and results.md from the rows so far: a long run killed midway keeps its finished rows."""
        (out / "results.json").write_text(
            json.dumps({"rows": rows, "traces": traces, "traced_depth": traced_depth}, indent=1)
        )
        lines = [
            f"Pass key in ~{a.tokens}-token documents ({len(depths)} cases per prompt style, depths "
            f"{', '.join(f'{d:g}' for d in depths)}), SmolLM2-135M-Instruct Q4_1, {time.perf_counter() - t0:.0f} s "
            "in one run. Found: count with Wilson 95% interval; p: exact McNemar test against the "
            "single-shot row on the same cases (the full cache's row: against the full cache).",
            "",
            "| configuration | found | p vs single-shot | p vs full | needle tokens kept per head | cells "
            "| compressions "
            "| streamed chunks s | their probes s | prompt s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, rs in rows.items():
            style = name.split(":", 1)[0]
            found = [r["found"] for r in rs]
            ref = lambda label: [r["found"] for r in rows.get(f"{style}: {label}", [])]  # noqa: E731
            p_single = mcnemar_exact(found, ref(single_name)) if ref(single_name) else float("nan")
            p_full = mcnemar_exact(found, ref(full_name)) if ref(full_name) else float("nan")
            lines.append(
                f"| {name} | {count_with_interval(sum(found), len(found))} | {p_single:.2f} | {p_full:.2f} | "
                f"{np.mean([r['needle_kept'] for r in rs]):.2f} | {max(r['cells'] for r in rs)} | "
                f"{max(r['compressions'] for r in rs)} | {sum(r['stream_seconds']['prefill'] for r in rs):.0f} | "
                f"{sum(r['stream_seconds']['probe'] for r in rs):.0f} | {sum(r['prompt_seconds'] for r in rs):.0f} |"
            )
        lines += [
            "",
            "Found per depth band (cases in each fifth of the document, all styles):",
            "",
            "| configuration | " + " | ".join(f"{b / 5:.1f}-{(b + 1) / 5:.1f}" for b in range(5)) + " |",
            "|---|" + "---:|" * 5,
        ]
        for name, rs in rows.items():
            bands = [[r["found"] for r in rs if min(int(r["depth"] * 5), 4) == b] for b in range(5)]
            lines.append(f"| {name} | " + " | ".join(f"{sum(b)}/{len(b)}" for b in bands) + " |")
        (out / "results.md").write_text("\n".join(lines) + "\n")
        return lines

    full_name = f"full cache (n_ctx={full_n_ctx})"
    single_name = f"single-shot kvcompose to {a.n_ctx - 1} cells ({KVComposePress().probe()[0]} probe)"
    for case in cases:
        if not a.no_full:
            full.kv_compress = None
            full.reset()
            record(full_name, full, case)
        if a.single_shot:  # the whole document compressed at once to the streamed runs' cache size
            full.kv_compress = KVComposePress(1 - (a.n_ctx - 1) / (len(case[3]) - 1))
            full.reset()
            record(single_name, full, case)
    write_results()
    full.close()
    for room in a.rooms:
        policy = StreamPolicy(
            room=room,
            chunk=a.chunk,
            question_drafts=a.question_drafts,
            question_consensus=a.question_consensus,
            question_every=a.question_every,
        )
        llm = Llama(n_ctx=a.n_ctx, n_batch=512, flash_attn=flash, verbose=False, kv_stream=policy)
        for spec, press, only in presses:
            if only not in (None, room):
                continue
            llm.kv_compress = press
            for case in cases:
                llm.reset()
                record(f"{spec} (n_ctx={a.n_ctx}, {room})", llm, case)
            write_results()
        llm.close()
    compression.compress = compress

    lines = write_results()
    print("\n".join(lines))
    plot(rows, depths, out / "needle_vs_depth.png")
    plot_traces(traces, traced_depth, out / "needle_per_head.png")


def plot(rows, depths, path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    fig, ax = plt.subplots(figsize=(8, 4.5))
    edges = np.linspace(0, 1, 6)
    for i, (name, rs) in enumerate(rows.items()):
        rate = [
            np.mean([r["found"] for r in rs if lo <= r["depth"] < hi] or [np.nan]) for lo, hi in zip(edges, edges[1:])
        ]
        offset = (i - len(rows) / 2) * 0.004  # keep overlapping curves visible
        ax.plot(
            (edges[:-1] + edges[1:]) / 2 + offset,
            np.array(rate) + offset,
            marker="o",
            linestyle="--" if "full cache" in name else "-",
            label=name,
        )
    ax.set_xlabel("needle depth in the document (fifths)")
    ax.set_ylabel("share of cases where the pass key was found")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("Documents longer than the cache: retrieval vs depth")
    ax.legend(fontsize=7, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def plot_traces(traces, depth, path) -> None:
    """Needle tokens kept per (layer, kv head) after each compression of one case, one panel per row."""
    traces = {name: t for name, t in traces.items() if t}
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    if not traces:
        return
    cols = min(4, len(traces))
    rows = -(-len(traces) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols + 1, 3.6 * rows), squeeze=False)
    for ax in axes.flat[len(traces) :]:
        ax.axis("off")
    for ax, (name, t) in zip(axes.flat, traces.items()):
        grid = np.array(t).reshape(len(t), -1).T  # (layer * kv_heads + head, compression)
        im = ax.imshow(grid, aspect="auto", vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
        ax.set_title(name.replace(" (", "\n("), fontsize=7)
        ax.set_xlabel("compression")
        ax.set_ylabel("layer x kv head")
    fig.subplots_adjust(hspace=0.5, wspace=0.35)
    fig.colorbar(im, ax=axes.ravel().tolist(), label="share of the needle's tokens kept")
    fig.suptitle(f"Needle at depth {depth:g}: kept per (layer, kv head) after each compression", fontsize=9)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
