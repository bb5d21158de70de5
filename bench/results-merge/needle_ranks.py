# ruff: noqa: E402
"""Diagnostic kept with the merge screen (issue 32): where the shipped question-agnostic ranking puts the magic
numbers of the multi-query documents (completion style, screening seeds), and whether the screen found them.
Per number: the prior's rank of its sentence (quantile among the context's tokens, 1 = most surprising), the
share of (layer, kv head) pairs whose kept cells hold every one of its digit tokens at 0.75 and 0.875, and the
merge screen's answer with the shipped cells (``none`` in the records FOUND names, default merge.jsonl).
``python bench/results-merge/needle_ranks.py``. needle_ranks.txt is its output before af2ac7c, when the prior's
sentences also ended at a colon, as in merge.jsonl; run now, it ranks by the shipped prior, and the answers it
reads should come from a screen run on the same code."""

import json
import os
import sys

import numpy as np

sys.path[:0] = ["bench", ".", os.path.dirname(__file__)]
import multi_query as mq
from screen import llm, shipped

from pykvcompose import KVComposePress
from pykvcompose.presses.kvcompose_press import ranks

found = {}
for line in open(os.environ.get("FOUND", os.path.join(os.path.dirname(__file__), "merge.jsonl"))):
    r = json.loads(line)
    if r["v"] == "none" and r["style"] == "completion":
        found[(r["seed"], r["ratio"], r["q"])] = r["ok"]
rows = []
for seed in range(int(os.environ.get("S0", 100)), int(os.environ.get("S1", 110))):
    tokenize = lambda t: llm.tokenize(t.encode(), add_bos=False)  # noqa: E731
    context, questions = mq.fact_document(tokenize, 1500, seed)
    conv = mq.Conversation(llm, "completion", context)
    ctx = conv.context_tokens
    llm.kv_compress = None
    llm.reset()
    probe = llm.kv_probe(ctx, [KVComposePress(0.75, scoring="reconstruct", self_information=True)])
    prior_q = ranks(probe.sentence_information())
    for qi, span in mq.number_tokens(llm, ctx, questions).items():
        pieces = [llm.detokenize([ctx[j]]).decode() for j in span]
        rec = dict(seed=seed, q=qi, prior=float(prior_q[span].mean()), tokens=pieces)
        for ratio in (0.75, 0.875):
            press = shipped(ratio)
            sel = press.select(press.score(probe), press.n_kept(len(ctx)))
            each = np.isin(span[None, None, :, None], sel[:, :, None, :]).any(-1)  # (layers, heads, digits)
            held = each.all(-1)
            rec[f"per_token_{ratio}"] = [round(float(x), 2) for x in each.mean(axis=(0, 1))]
            rec[f"heads_{ratio}"] = float(held.mean())
            rec[f"found_{ratio}"] = found.get((seed, ratio, qi))
        rows.append(rec)
        print(json.dumps(rec), flush=True)
for ratio in (0.75, 0.875):
    for ok in (True, False):
        sub = [r for r in rows if r[f"found_{ratio}"] is ok]
        if sub:
            print(
                ratio,
                "found" if ok else "missed",
                len(sub),
                "prior quantile",
                f"{np.mean([r['prior'] for r in sub]):.2f}",
                "heads holding every digit",
                f"{np.mean([r[f'heads_{ratio}'] for r in sub]):.2f}",
            )
