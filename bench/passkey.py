"""Pass-key retrieval vs depth on the embedded model: full cache against presses, in one run.

    python bench/passkey.py [--tokens 1500] [--depths 0.1 0.3 0.5 0.7 0.9] [--model gemma3-270m]
                            [--configs NAME ...]

--model takes a label of the benchmark's model table (smollm2-135m, gemma3-270m) or a GGUF path.
On Gemma 3 (interleaved sliding-window attention) only the global layers' cache is compressed.

Prints a markdown table (found / cases) per configuration and ratio.
"""

from __future__ import annotations

import argparse
import time

import os

from pykvcompose import KVComposePress, Llama
from pykvcompose.benchmark.runner import MODELS
from pykvcompose.demo import answer
from pykvcompose.haystack import passkey_cases

CONFIGS = {
    "KVCompose (paper: per-head, reconstruct)": {},
    "KVCompose, window probe": {"scoring": "window"},
    "KVCompose, head_consensus=1": {"head_consensus": 1.0},
    "KVCompose, starved_layers=consensus": {"starved_layers": "consensus"},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tokens", type=int, default=1500)
    p.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    p.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.75])
    p.add_argument("--model", default="smollm2-135m", help=f"one of {sorted(MODELS)} or a GGUF path")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS), metavar="NAME",
                   help="which KVCompose configurations to run (default: all)")
    a = p.parse_args()
    configs = {name: CONFIGS[name] for name in a.configs}
    path = a.model if os.path.isfile(a.model) else MODELS[a.model]()
    llm = Llama(path, n_ctx=2 * a.tokens + 256, verbose=False)
    print(f"{a.model}: compressed layers {llm.kv_layers}", flush=True)
    tok = lambda s: llm.tokenize(s.encode(), add_bos=False)  # noqa: E731
    cases = [(d, key, llm.tokenize(prompt.encode())) for d, key, prompt in passkey_cases(tok, a.tokens, a.depths)]
    found = {"full cache": [0]}
    found.update({name: [0] * len(a.ratios) for name in configs})
    t0 = time.perf_counter()
    for depth, key, toks in cases:
        llm.kv_compress = None
        llm.reset()
        row = [str(key) in answer(llm, toks, 8)["text"]]
        found["full cache"][0] += row[0]
        for name, kw in configs.items():
            for j, r in enumerate(a.ratios):
                llm.kv_compress = KVComposePress(compression_ratio=r, **kw)
                llm.reset()
                ok = str(key) in answer(llm, toks, 8)["text"]
                found[name][j] += ok
                row.append(ok)
        print(f"depth {depth:.1f} ({len(toks)} tokens): " + " ".join("Y" if x else "." for x in row), flush=True)
    n = len(cases)
    print(f"\n{n} cases of ~{a.tokens} tokens, depths {a.depths}, {time.perf_counter() - t0:.0f} s\n")
    print("| configuration | " + " | ".join(f"ratio {r}" for r in a.ratios) + " |")
    print("|---|" + "---:|" * len(a.ratios))
    print("| full cache | " + " | ".join(f"{found['full cache'][0]}/{n}" for _ in a.ratios) + " |")
    for name in configs:
        print(f"| {name} | " + " | ".join(f"{v}/{n}" for v in found[name]) + " |")


if __name__ == "__main__":
    main()
