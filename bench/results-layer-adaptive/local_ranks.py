# ruff: noqa: E402
"""Diagnostic (issue 32): does a short window's self-information rank the magic numbers' sentences higher than the
shipped prior's? Per screening seed (completion), each sentence's maximum ``-log p(token | earlier tokens)`` over the
whole context (the prefill's, shipped) and over only the 128-256 tokens before each token
(``multi_query.local_information``); printed: the three needles' sentence ranks among the ~180 (0 is the top), in
the order they appear. Output: local_ranks.txt. ``python bench/results-layer-adaptive/local_ranks.py``"""

import sys

import numpy as np

sys.path[:0] = ["bench", "."]
import multi_query as mq

from pykvcompose import Llama
from pykvcompose.models import default_model_path

llm = Llama(default_model_path(), n_ctx=3600, n_batch=512, verbose=False)
found = {}
for seed in range(100, 112):
    ctx, questions, probe = mq.probed_fact_document(llm, seed)
    sent = probe.sentences
    n_sent = sent.max() + 1
    first_digits = sorted(digits[0] for digits in mq.number_tokens(llm, ctx, questions).values())
    needles = [int(sent[i]) for i in first_digits]
    for name, info in (("global", probe.self_information), ("local", mq.local_information(ctx, 128))):
        peak = np.full(n_sent, -np.inf)
        np.maximum.at(peak, sent, info)
        place = np.empty(n_sent, dtype=int)
        place[np.argsort(-peak, kind="stable")] = np.arange(n_sent)
        found.setdefault(name, []).append([int(place[i]) for i in needles])
    print(seed, {name: ranks[-1] for name, ranks in found.items()}, flush=True)
for name, ranks in found.items():
    ranks = np.array(ranks)
    print(
        f"{name}: median rank {np.median(ranks)}, top 10 {np.mean(ranks < 10):.2f}, median by needle order"
        f" {np.median(ranks, axis=0).tolist()}"
    )
