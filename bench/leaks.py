"""Resident memory over many compressions in one process (issue 7: it must stay flat).

    python bench/leaks.py [--compressions 1000] [--tokens 96]

Alternates the paths that allocate: KVCompose's reconstruct probe + composite rewrite, SnapKV's window
probe, token-level eviction, and compressions that make room past n_ctx. Prints RSS after warm-up and
every 10% of the run, and the growth per 100 compressions over the second half.
"""

from __future__ import annotations

import argparse
import time

from kvbench.haystack import haystack_text
from pykvcompose import Llama
from pykvcompose.presses import KVComposePress, SnapKVPress


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    import os

    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compressions", type=int, default=1000)
    p.add_argument("--tokens", type=int, default=96)
    a = p.parse_args()
    llm = Llama(n_ctx=256, n_batch=128, verbose=False)
    text = haystack_text()
    presses = [
        KVComposePress(0.5, min_tokens=16),
        KVComposePress(0.5, min_tokens=16, scoring="reconstruct"),
        SnapKVPress(0.5),
        SnapKVPress(0.5, per_head=False),
    ]
    t0 = time.perf_counter()
    samples = []
    for i in range(a.compressions):
        start = (i * 997) % (len(text) - 4000)
        tokens = llm.tokenize(text[start : start + 4000].encode())[: a.tokens]
        if i % 4 == 3:  # past n_ctx: a prompt of three caches, compressed to make room
            llm.kv_compress = SnapKVPress(0.5)
            llm.reset()
            llm.eval(llm.tokenize(text[start : start + 8000].encode())[:600])
        else:
            llm.compress_context(tokens, presses[i % 4])
        if i == 19:
            samples.append((i + 1, rss_mib()))
            print(f"after warm-up ({i + 1} compressions): RSS {samples[-1][1]:.1f} MiB", flush=True)
        if (i + 1) % max(1, a.compressions // 10) == 0:
            samples.append((i + 1, rss_mib()))
            print(
                f"{i + 1:5d} compressions: RSS {samples[-1][1]:.1f} MiB ({time.perf_counter() - t0:.0f} s)", flush=True
            )
    half = [s for s in samples if s[0] >= a.compressions // 2]
    growth = (half[-1][1] - half[0][1]) / max(1, half[-1][0] - half[0][0]) * 100
    print(
        f"\nRSS growth over the second half: {growth:+.2f} MiB per 100 compressions "
        f"(warm-up {samples[0][1]:.1f} MiB, end {samples[-1][1]:.1f} MiB)"
    )
    llm.close()


if __name__ == "__main__":
    main()
