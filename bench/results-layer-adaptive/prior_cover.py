# ruff: noqa: E402, E731
"""Diagnostic (issue 32): do the prior's top sentences hold the magic numbers that the shipped selection loses? Per
screening seed (completion) and ratio, each number counted as covered (its digits inside the sentences of highest
maximum self-information that fit in half the cells, what ``screen.py``'s ``flattop50`` forces) or missed, against
the answers of the ``shipped`` and ``flattop50`` variants in ``flat.jsonl``. Output: prior_cover.txt.
``python bench/results-layer-adaptive/prior_cover.py``"""

import json
import sys
from collections import Counter

sys.path[:0] = ["bench", "."]
import multi_query as mq

from pykvcompose import KVComposePress, Llama
from pykvcompose.models import default_model_path

llm = Llama(default_model_path(), n_ctx=3600, n_batch=512, verbose=False)
ok = {}
with open("bench/results-layer-adaptive/flat.jsonl") as records:
    for r in map(json.loads, records):
        ok[(r["seed"], r["ratio"], r["v"], r["q"])] = r["ok"]
counts = Counter()
for seed in range(100, 112):
    ctx, questions, probe = mq.probed_fact_document(llm, seed)
    for ratio in (0.75, 0.875):
        cells = KVComposePress(ratio).n_kept(len(ctx))
        top = mq.top_sentences(probe.sentence_information(), probe.sentences, 0.5 * cells)
        for qi, digits in mq.number_tokens(llm, ctx, questions).items():
            counts[
                (
                    ratio,
                    "covered" if top[digits].all() else "missed",
                    "shipped " + ("answers" if ok[(seed, ratio, "shipped", qi)] else "fails"),
                    "flattop50 " + ("answers" if ok[(seed, ratio, "flattop50", qi)] else "fails"),
                )
            ] += 1
for key in sorted(counts):
    print(*key, counts[key])
