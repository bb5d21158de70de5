"""Counts and KL ratios of screen.py's records against the published selection ("pub"), with exact McNemar
and paired bootstrap p: python bench/results-prior-share/report.py [records.jsonl]."""

import collections
import json
import os
import sys

import numpy as np

sys.path.insert(0, "bench")
from kvbench.stats import mcnemar_exact, paired_bootstrap_p  # noqa: E402

BASE = os.environ.get("BASE", "pub")  # the variant the others are compared with
path = sys.argv[1] if len(sys.argv) > 1 else "bench/results-prior-share/shares.jsonl"
recs = [json.loads(l) for l in open(path)]
ok = collections.defaultdict(dict)
kl = collections.defaultdict(dict)
for r in recs:
    if r["style"] == "kl":
        kl[(r["ratio"], r["v"])][r["seed"]] = r["kl"]
    else:
        ok[(r["style"], r["ratio"], r["v"])][(r["seed"], r["q"])] = r["ok"]
vs = sorted({k[-1] for k in ok} | {k[-1] for k in kl})
for ratio in sorted({k[1] for k in ok} | {k[0] for k in kl}):
    print(f"ratio {ratio}")
    for v in vs:
        row = [v.ljust(8)]
        for style in ("completion", "chat"):
            d = ok.get((style, ratio, v), {})
            p = ok.get((style, ratio, BASE), {})
            keys = [k for k in d if k in p]
            b = sum(d[k] and not p[k] for k in keys)
            c = sum(p[k] and not d[k] for k in keys)
            mp = mcnemar_exact([d[k] for k in keys], [p[k] for k in keys])
            row.append(f"{style[:4]} {sum(d.values())}/{len(d)} (+{b}/-{c}, p={mp:.3f})")
        d = kl.get((ratio, v), {})
        p = kl.get((ratio, BASE), {})
        seeds = [s for s in d if s in p]
        if seeds:
            lr = np.log([d[s] / p[s] for s in seeds])
            row.append(
                f"KL {np.mean([d[s] for s in seeds]):.4f} x{np.exp(lr.mean()):.2f} worse {sum(lr > 0)}/{len(seeds)}"
                f" p={paired_bootstrap_p([d[s] for s in seeds], [p[s] for s in seeds]):.3f}"
            )
        print("  ", "  ".join(row))
