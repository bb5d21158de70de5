"""A captured batch of 60 query rows over 880 cells, flash attention on: unpadded against padded up to 64 rows
(ggml's CPU flash kernel runs tiled from 64 rows), with ggml's kernel kept (``KVC_KEEP_FLASH_KERNEL=1``) and
skipped (the capture computes the attention), alternating, 5 rounds; medians in ms.

    python bench/results-cost-once/pad_ab.py [rows]
"""

import os
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from speed import haystack_tokens  # noqa: E402

from pykvcompose import Llama  # noqa: E402
from pykvcompose.models import default_model_path  # noqa: E402
from pykvcompose.probing import decode_at  # noqa: E402

rows = int(sys.argv[1]) if len(sys.argv) > 1 else 60
m = Llama(default_model_path(), n_ctx=1024, flash_attn=True, n_threads=2, verbose=False)
toks = haystack_tokens()[:1000]
m.eval(toks[:880])
e = m._engine
base = e.conv.n_tokens
res = {}
for _ in range(5):
    for keep in ("1", "0"):
        os.environ["KVC_KEEP_FLASH_KERNEL"] = keep
        for pad in (0, 64 - rows):
            batch = toks[880 : 880 + rows] + toks[880 + rows - 1 : 880 + rows] * pad  # padding: the last token again
            t = time.perf_counter()
            e.captured(lambda: decode_at(e, batch, base), base, 0, pooled_rows=rows if pad else 0)
            res.setdefault((keep, pad), []).append(time.perf_counter() - t)
            e.remove(base)
for (keep, pad), v in sorted(res.items()):
    kernel = "kept" if keep == "1" else "skipped"
    every = [round(1000 * x) for x in v]
    print(f"kernel {kernel} padding {pad:2d}: median {1000 * statistics.median(v):.0f} ms, all {every}")
m.close()
