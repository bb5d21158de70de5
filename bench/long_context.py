"""Pass-key retrieval vs depth in documents several times longer than the cache, in one run.

    python bench/long_context.py [--tokens 7000] [--n-ctx 2048] [--depths 0.1 0.3 0.5 0.7 0.9]

The document is prefilled in chunks and the cache compressed by the press whenever the next chunk
would not fit (``Llama(n_ctx=2048, kv_compress=...)``); the reference is the full cache
(``n_ctx`` large enough for the whole document). Writes ``results.md``, ``results.json`` and
``needle_vs_depth.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

from pykvcompose import Llama
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
    p.add_argument("--out", default="bench/results-long")
    a = p.parse_args()
    presses = {spec: parse_press_spec(spec) for spec in a.presses}  # refuse a bad spec before any work
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    full = Llama(n_ctx=a.tokens + 256, n_batch=512, verbose=False)
    tok = lambda s: full.tokenize(s.encode(), add_bos=False)  # noqa: E731
    cases = [(d, key, full.tokenize(prompt.encode())) for d, key, prompt in passkey_cases(tok, a.tokens, a.depths)]
    rows = {}
    t0 = time.perf_counter()

    def record(name, llm, depth, key, toks):
        res = answer(llm, toks, 12)
        m = llm.kv_memory()
        rows.setdefault(name, []).append({
            "depth": depth, "tokens": len(toks), "found": str(key) in res["text"], "answer": res["text"].strip()[:40],
            "cells": m["cells"], "compressions": llm.kv_compressions, "prompt_seconds": res["prompt_seconds"]})
        r = rows[name][-1]
        print(f"{name:32s} depth {depth:.1f}: {'found' if r['found'] else 'missed':6s} {r['answer']!r:44s} "
              f"cells {r['cells']:5d} compressions {r['compressions']:2d} prompt {r['prompt_seconds']:.0f}s "
              f"| {time.perf_counter() - t0:.0f}s", flush=True)

    for depth, key, toks in cases:
        full.reset()
        record(f"full cache (n_ctx={a.tokens + 256})", full, depth, key, toks)
    full.close()
    llm = Llama(n_ctx=a.n_ctx, n_batch=512, verbose=False)
    for spec, press in presses.items():
        llm.kv_compress = press
        for depth, key, toks in cases:
            llm.reset()
            record(f"{spec} (n_ctx={a.n_ctx})", llm, depth, key, toks)
    llm.close()

    (out / "results.json").write_text(json.dumps(rows, indent=1))
    lines = [f"Pass key in a {cases[0][2].__len__()}-token document (depths {', '.join(f'{d:g}' for d in a.depths)}), "
             f"SmolLM2-135M-Instruct Q4_1, {time.perf_counter() - t0:.0f} s in one run.", "",
             "| configuration | " + " | ".join(f"depth {d:g}" for d in a.depths) + " | found | cells | compressions |",
             "|---|" + "---|" * len(a.depths) + "---:|---:|---:|"]
    for name, rs in rows.items():
        lines.append(f"| {name} | " + " | ".join("yes" if r["found"] else "no" for r in rs)
                     + f" | {sum(r['found'] for r in rs)}/{len(rs)} | {max(r['cells'] for r in rs)} | "
                     f"{max(r['compressions'] for r in rs)} |")
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
