"""Pass-key retrieval vs depth in documents several times longer than the cache, in one run.

    python bench/long_context.py [--tokens 7000] [--n-ctx 2048] [--depths 0.1 0.3 0.5 0.7 0.9]
                                 [--rooms ratio fill] [--style completion|chat] [--single-shot]

The document is prefilled in chunks and the cache compressed by the press whenever the next chunk
would not fit (``Llama(n_ctx=2048, kv_compress=..., kv_room=...)``), once per ``--rooms`` entry; the
reference is the full cache (``n_ctx`` large enough for the whole document) and, with
``--single-shot``, KVCompose compressing the whole document at once to ``n_ctx - 1`` cells. Every row
also reports how many of the needle's tokens each (layer, kv head) still holds at the end. Writes
``results.md``, ``results.json`` and ``needle_vs_depth.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import numpy as np

from pykvcompose import KVComposePress, Llama
from pykvcompose.demo import answer
from pykvcompose.haystack import passkey_cases
from pykvcompose.presses import parse_press_spec

PRESSES = ["kvcompose:0.5", "kvcompose:0.75", "kvcompose:0.5,head_consensus=1", "snapkv:0.5", "streaming_llm:0.5"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=7000)
    p.add_argument("--n-ctx", type=int, default=2048)
    p.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    p.add_argument("--presses", nargs="+", default=PRESSES, help="press specs NAME:RATIO[,key=value...]")
    p.add_argument("--rooms", nargs="+", default=["ratio"], choices=["ratio", "fill"])
    p.add_argument("--chunk", type=int, help="kv_chunk for kv_room=fill")
    p.add_argument("--style", default="completion", choices=["completion", "chat"],
                   help="chat: the document and question inside SmolLM2's chat template")
    p.add_argument("--single-shot", action="store_true", help="also KVCompose on the whole document at once")
    p.add_argument("--max-tokens", type=int, default=20)
    p.add_argument("--out", default="bench/results-long")
    a = p.parse_args()
    presses = {spec: parse_press_spec(spec) for spec in a.presses}  # refuse a bad spec before any work
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    full = Llama(n_ctx=2 * a.tokens + 512 if a.single_shot else a.tokens + 256, n_batch=512, verbose=False)
    tok = lambda s: full.tokenize(s.encode(), add_bos=False)  # noqa: E731
    cases = []
    for depth, key, prompt in passkey_cases(tok, a.tokens, a.depths):
        if a.style == "chat":
            body = prompt.rsplit("\n\n", 1)[0]
            prompt = (f"<|im_start|>user\n{body}\n\nWhat is the pass key? Answer with the number only.<|im_end|>\n"
                      "<|im_start|>assistant\n")
        toks = full.tokenize(prompt.encode())
        needle = full.tokenize(f"The pass key is {key}".encode(), add_bos=False)
        at = next(i for i in range(len(toks)) if toks[i:i + len(needle)] == needle)
        cases.append((depth, key, toks, np.arange(at, at + len(needle))))
    rows = {}
    t0 = time.perf_counter()

    def record(name, llm, depth, key, toks, needle):
        llm.kv_selection = None  # set again only if this run compresses
        res = answer(llm, toks, a.max_tokens)
        m = llm.kv_memory()
        kept = 1.0 if llm.kv_selection is None else float(np.isin(llm.kv_selection, needle).sum(-1).mean() / len(needle))
        rows.setdefault(name, []).append({
            "depth": depth, "tokens": len(toks), "found": str(key) in res["text"], "answer": res["text"].strip()[:40],
            "cells": m["cells"], "compressions": llm.kv_compressions, "prompt_seconds": res["prompt_seconds"],
            "needle_kept": kept, "stream_seconds": llm.kv_stream_seconds})
        r = rows[name][-1]
        print(f"{name:32s} depth {depth:.2f}: {'found' if r['found'] else 'missed':6s} {r['answer']!r:44s} "
              f"cells {r['cells']:5d} compressions {r['compressions']:2d} needle kept {kept:.2f} "
              f"prompt {r['prompt_seconds']:.0f}s (chunks {r['stream_seconds']['prefill']:.1f}s, their probes "
              f"{r['stream_seconds']['probe']:.1f}s) | {time.perf_counter() - t0:.0f}s", flush=True)

    for depth, key, toks, needle in cases:
        full.kv_compress = None
        full.reset()
        record(f"full cache (n_ctx={a.tokens + 256})", full, depth, key, toks, needle)
        if a.single_shot:  # the whole document compressed at once to the streamed runs' cache size
            full.kv_compress = KVComposePress(1 - (a.n_ctx - 1) / (len(toks) - 1))
            full.reset()
            record(f"single-shot kvcompose to {a.n_ctx - 1} cells", full, depth, key, toks, needle)
    full.close()
    for room in a.rooms:
        llm = Llama(n_ctx=a.n_ctx, n_batch=512, verbose=False, kv_room=room, kv_chunk=a.chunk)
        for spec, press in presses.items():
            llm.kv_compress = press
            for depth, key, toks, needle in cases:
                llm.reset()
                record(f"{spec} (n_ctx={a.n_ctx}, {room})", llm, depth, key, toks, needle)
        llm.close()

    (out / "results.json").write_text(json.dumps(rows, indent=1))
    lines = [f"Pass key in a {cases[0][2].__len__()}-token document (depths {', '.join(f'{d:g}' for d in a.depths)}), "
             f"SmolLM2-135M-Instruct Q4_1, {time.perf_counter() - t0:.0f} s in one run.", "",
             "| configuration | " + " | ".join(f"depth {d:g}" for d in a.depths)
             + " | found | needle tokens kept per head | cells | compressions |",
             "|---|" + "---|" * len(a.depths) + "---:|---:|---:|---:|"]
    for name, rs in rows.items():
        lines.append(f"| {name} | " + " | ".join("yes" if r["found"] else "no" for r in rs)
                     + f" | {sum(r['found'] for r in rs)}/{len(rs)} | {np.mean([r['needle_kept'] for r in rs]):.2f} | "
                     f"{max(r['cells'] for r in rs)} | {max(r['compressions'] for r in rs)} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(rows, a.depths, out / "needle_vs_depth.png")


def plot(rows, depths, path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (name, rs) in enumerate(rows.items()):
        offset = (i - len(rows) / 2) * 0.006  # keep overlapping curves visible
        ax.plot([r["depth"] + offset for r in rs], [int(r["found"]) + offset * 3 for r in rs], marker="o",
                linestyle="--" if name.startswith("full") else "-", label=name)
    ax.set_xlabel("needle depth in the document")
    ax.set_ylabel("pass key found (1) / missed (0)")
    ax.set_yticks([0, 1])
    ax.set_xticks(depths)
    ax.set_title("Documents longer than the cache: retrieval vs depth")
    ax.legend(fontsize=7, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
