"""Two builds of the native library on the same probe, alternating: what a change to the capture costs or saves.

    python bench/probe_ab.py --lib build/a/libkvcompose.so --lib build/b/libkvcompose.so
                             [--tokens 2048] [--flash on] [--scoring reconstruct] [--repeat 4] [--out DIR]

Each run is a fresh process with ``PYKVCOMPOSE_LIBRARY`` set to one library (a library is loaded once per
process): ``create_completion(prompt, max_tokens=1)`` of the haystack's first ``--tokens`` tokens with
``KVComposePress(0.75, scoring=...)`` on the embedded model with the cost bench's settings, and the probe's
seconds against the same run's prefill (``kv_stats``: 1 + probe / prefill, steadier than whole runs on this
shared machine). The libraries
alternate run by run, so both see the same machine; the table gives every run and each library's median.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys


def probe_once(tokens: int, flash: bool, scoring: str) -> dict:
    """One probe in this process (``--child``): the seconds of ``kv_stats``, the cost bench's settings."""
    from cost import RATIO, llama_kwargs
    from speed import haystack_tokens

    from pykvcompose import KVComposePress, Llama
    from pykvcompose.models import default_model_path

    kw = llama_kwargs(flash, "f16", n_ctx=2 * tokens + 256)
    llm = Llama(default_model_path(), kv_compress=KVComposePress(RATIO, scoring=scoring), **kw)
    llm.create_completion(haystack_tokens()[:tokens], max_tokens=1, temperature=0.0)
    st = llm.kv_stats
    llm.close()
    return {k: st[k] for k in ("prefill_seconds", "probe_seconds", "compress_seconds")}


def one_run(lib: str, tokens: int, flash: bool, scoring: str) -> dict:
    """probe_once in a fresh process that loads ``lib``."""
    cmd = [sys.executable, __file__, "--child", "--tokens", str(tokens), "--flash", "on" if flash else "off"]
    env = dict(os.environ, PYKVCOMPOSE_LIBRARY=str(pathlib.Path(lib).resolve()))
    out = subprocess.run([*cmd, "--scoring", scoring], env=env, check=True, capture_output=True, text=True).stdout
    row = json.loads(out.strip().splitlines()[-1])
    row["parts"] = 1.0 + row["compress_seconds"] / row["prefill_seconds"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lib", action="append", default=[], help="a libkvcompose.so (give two or more)")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--flash", choices=["off", "on"], default="on")
    ap.add_argument("--scoring", default="reconstruct")
    ap.add_argument("--repeat", type=int, default=4)
    ap.add_argument("--out", type=pathlib.Path, default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(probe_once(args.tokens, args.flash == "on", args.scoring)))
        return
    if len(args.lib) < 2:
        ap.error("give at least two --lib")
    rows = []
    for r in range(args.repeat):
        for lib in args.lib:
            row = dict(lib=lib, run=r, **one_run(lib, args.tokens, args.flash == "on", args.scoring))
            rows.append(row)
            print(json.dumps(row), flush=True)
    lines = [
        f"{args.tokens} tokens, flash {args.flash}, scoring={args.scoring!r}, 0.75; runs alternating, "
        f"{args.repeat} per library",
        "",
        "| library | prefill s | probe s (each run) | probe + selection + rewrite / prefill (each run) | median |",
        "|---|---|---|---|---:|",
    ]
    for lib in args.lib:
        mine = [row for row in rows if row["lib"] == lib]
        prefill = ", ".join(f"{row['prefill_seconds']:.1f}" for row in mine)
        probe = ", ".join(f"{row['probe_seconds']:.1f}" for row in mine)
        parts = ", ".join(f"{row['parts']:.2f}x" for row in mine)
        median = statistics.median(row["parts"] for row in mine)
        lines.append(f"| `{lib}` | {prefill} | {probe} | {parts} | {median:.2f}x |")
    print("\n".join(lines))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        (args.out / "results.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
