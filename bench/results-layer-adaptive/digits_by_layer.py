# ruff: noqa: E402, E731
"""Diagnostic (issue 32): in which layers do the kept cells hold the magic numbers? Per screening seed (completion
style) and ratio, per layer ``layer:budget:shipped/layer-adaptive``: the paper's layer budget, and the share of
(kv head, number) pairs whose kept tokens hold every digit of the number, with ``compress_context``'s uniform
selection and with the authors' per-layer budgets. Output: digits_by_layer.txt (the shipped selection with its
layer budgets, d3ea5c5; before them, at cebdf38, only the peaked layers' shares differed).
``python bench/results-layer-adaptive/digits_by_layer.py``"""

import sys

import numpy as np

sys.path[:0] = ["bench", "."]
import multi_query as mq

from pykvcompose import KVComposePress, Llama
from pykvcompose.models import default_model_path
from pykvcompose.streaming import question_agnostic

llm = Llama(default_model_path(), n_ctx=3600, n_batch=512, verbose=False)
for seed in range(100, 104):
    ctx, questions, probe = mq.probed_fact_document(llm, seed)
    spans = list(mq.number_tokens(llm, ctx, questions).values())
    n = len(ctx)
    for ratio in (0.75, 0.875):
        pub = KVComposePress(ratio, scoring="reconstruct")
        sc = pub.score(probe)
        b = pub.layer_budgets(sc)
        c = pub.n_kept(n)
        sh = question_agnostic(KVComposePress(ratio))
        sel = sh.select(sh.score(probe), c)
        order = np.argsort(-sc, axis=-1, kind="stable")
        rows = []
        for il in range(sc.shape[0]):
            s_sh = np.mean([np.isin(sp, sel[il, g]).all() for sp in spans for g in range(sc.shape[1])])
            s_la = np.mean([np.isin(sp, order[il, g, : b[il]]).all() for sp in spans for g in range(sc.shape[1])])
            rows.append(f"{il}:{b[il]}:{s_sh:.2f}/{s_la:.2f}")
        print(seed, ratio, "C", c, " ".join(rows), flush=True)
