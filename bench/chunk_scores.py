"""Are persisted chunk scores comparable across chunks? (``kv_room="fill"``, issue 15)

    python bench/chunk_scores.py [--tokens 3500] [--n-ctx 1024] [--chunk 128] [--docs 3]

Streams haystack documents through a small cache with ``KVComposePress`` and ``kv_room="fill"``,
recording every chunk's reconstruct-probe scores when they are first given (``streaming.score_cells``):
how many cache cells the probe saw, and the median / 90th percentile of the new cells' scores (max
over probe queries, mean over layers and query heads). A chunk probed against a small cache (the
first chunks) spreads its softmax over fewer keys; if its scores are systematically higher, early
chunks win every later ranking. The last column is the share of each chunk's tokens that the final
cache still holds (mean over layers and kv heads): with comparable scores it has no trend with the
chunk's position, apart from the attention sink in the first chunk.
"""

from __future__ import annotations

import argparse

import numpy as np

from kvbench.haystack import passkey_cases
from pykvcompose import KVComposePress, Llama, streaming


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=3500)
    p.add_argument("--n-ctx", type=int, default=1024)
    p.add_argument("--chunk", type=int, default=128)
    p.add_argument("--docs", type=int, default=3)
    a = p.parse_args()
    llm = Llama(
        n_ctx=a.n_ctx,
        n_batch=512,
        verbose=False,
        kv_room="fill",
        kv_chunk=a.chunk,
        kv_compress=KVComposePress(compression_ratio=0.75),
    )
    tok = lambda s: llm.tokenize(s.encode(), add_bos=False)  # noqa: E731
    records = []  # (doc, visible cells, first position, new scores (cells,))
    original = streaming.score_cells

    def recording(engine):
        conv = engine.conv
        first, cells, start = conv.scored_cells, conv.cells, conv.n_tokens - (conv.cells - conv.scored_cells)
        ok = original(engine)
        if ok and conv.scored_cells > first:
            new = conv.cell_scores["max"][..., first:].astype(np.float64).mean(axis=(0, 1))
            records.append((doc, cells, start, new))
        return ok

    streaming.score_cells = recording
    survival = []
    for doc, (_, _, prompt) in enumerate(  # noqa: B007  (recording() reads doc)
        passkey_cases(tok, a.tokens, np.linspace(0.1, 0.9, a.docs))
    ):
        llm.reset()
        toks = llm.tokenize(prompt.encode())
        llm.eval(toks)
        kept = llm.kv_selection  # (layers, kv_heads, C) positions the composite cells hold
        tail = np.arange(llm.kv_stats["tokens"], len(toks))  # streamed in after the last compression: all kept
        n_chunks = -(-len(toks) // a.chunk)
        counts = np.stack(
            [
                ((kept >= c * a.chunk) & (kept < (c + 1) * a.chunk)).sum(-1).mean()
                + ((tail >= c * a.chunk) & (tail < (c + 1) * a.chunk)).sum()
                for c in range(n_chunks)
            ]
        )
        survival.append(counts / np.minimum(a.chunk, len(toks) - np.arange(n_chunks) * a.chunk))
    streaming.score_cells = original
    print(f"{a.docs} documents of ~{a.tokens} tokens through n_ctx={a.n_ctx}, chunks of {a.chunk}\n")
    print(
        "| chunk (positions) | cells the probe saw | median score | p90 score | median x cells seen | kept at the end |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    by_chunk = {}
    for _doc, cells, start, new in records:
        by_chunk.setdefault(start // a.chunk, []).append((cells, new))
    for c in sorted(by_chunk):
        cells = np.mean([x for x, _ in by_chunk[c]])
        new = np.concatenate([s for _, s in by_chunk[c]])
        kept = np.mean([s[c] for s in survival if c < len(s)])
        print(
            f"| {c} ({c * a.chunk}-{(c + 1) * a.chunk - 1}) | {cells:.0f} | {np.median(new):.4f} | "
            f"{np.percentile(new, 90):.4f} | {np.median(new) * cells:.2f} | {kept:.2f} |"
        )


if __name__ == "__main__":
    main()
