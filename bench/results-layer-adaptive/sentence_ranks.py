# ruff: noqa: E402, E731
"""Diagnostic (issue 32): how high do question-agnostic sentence signals rank the magic numbers' sentences? Per
screening seed (completion), each sentence scored by its self-information (maximum: the shipped prior; sum; mean;
``topK``: the sum of its K highest) and by the reconstruct probe's per-head rank quantiles (each sentence's best
token, averaged over the heads of the flat layers, whose paper budget at 0.75 exceeds the cells, or of the fitting
ones; ``maxmax``: the best head); printed: the needles' rank among the ~180 sentences (0 is the top) and the
biography's (its city's sentence). Output: sentence_ranks.txt.
``python bench/results-layer-adaptive/sentence_ranks.py``"""

import sys

import numpy as np

sys.path[:0] = ["bench", "."]
import multi_query as mq

from pykvcompose import KVComposePress, Llama
from pykvcompose.models import default_model_path
from pykvcompose.presses.kvcompose_press import ranks

llm = Llama(default_model_path(), n_ctx=3600, n_batch=512, verbose=False)
found = {}
for seed in range(100, 112):
    ctx, questions, probe = mq.probed_fact_document(llm, seed)
    sent, info, n = probe.sentences, probe.self_information, len(ctx)
    n_sent = sent.max() + 1
    needles = sorted({int(sent[digits[0]]) for digits in mq.number_tokens(llm, ctx, questions).values()})
    text, starts = mq.token_offsets(llm, ctx)
    city = next(q for q in questions if "city" in q.chat).answer
    biography = int(sent[np.searchsorted(starts, text.find((" " + city).encode()), side="right") - 1])
    size = np.bincount(sent, minlength=n_sent)
    published = KVComposePress(0.75, scoring="reconstruct")
    scores = published.score(probe)
    fits = published.layer_budgets(scores) <= published.n_kept(n)
    peak = np.full(n_sent, -np.inf)
    np.maximum.at(peak, sent, info)
    total = np.bincount(sent, weights=info, minlength=n_sent)
    signals = {"max_si": peak, "sum_si": total, "mean_si": total / np.maximum(size, 1)}
    ordered = [np.sort(info[sent == s])[::-1] for s in range(n_sent)]  # each sentence's tokens, most surprising first
    for k in (2, 3, 5, 8):  # several surprising tokens (a number's digits) rather than one
        signals[f"top{k}_si"] = np.array([o[:k].sum() for o in ordered])
    quantiles = ranks(scores)
    for name, layers in (("fit", fits), ("flat", ~fits)):
        heads = quantiles[layers].reshape(-1, n)
        best = np.full((len(heads), n_sent), -np.inf)
        for h, row in enumerate(heads):
            np.maximum.at(best[h], sent, row)
        signals[f"{name}_max"] = best.mean(axis=0)
        signals[f"{name}_mean"] = np.stack([np.bincount(sent, weights=row, minlength=n_sent) for row in heads]).mean(
            axis=0
        ) / np.maximum(size, 1)
        signals[f"{name}_maxmax"] = best.max(axis=0)
    for name, value in signals.items():
        place = np.empty(n_sent, dtype=int)
        place[np.argsort(-value, kind="stable")] = np.arange(n_sent)
        found.setdefault(name, ([], []))
        found[name][0].extend(int(place[i]) for i in needles)
        found[name][1].append(int(place[biography]))
for name, (needle, bio) in found.items():
    needle = np.array(needle)
    print(
        f"{name:12s} needles: median rank {np.median(needle):5.1f}, top 10 {np.mean(needle < 10):.2f}, top 5"
        f" {np.mean(needle < 5):.2f}; biography median {np.median(bio):5.1f}; needle ranks {sorted(needle.tolist())}"
    )
