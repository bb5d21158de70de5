"""The reconstruct probe's copy in pieces (KVzip's chunked scoring), measured against the whole copy: not kept.

    python bench/results-reconstruct-pieces/pieces.py run bench/multi_query.py --contexts 30 --modes independent \
        --presses kvcompose kvcompose-information --out OUT        # any bench script, the probe in pieces
    python bench/results-reconstruct-pieces/pieces.py cost 4096     # time to first token vs plain, interleaved
    python bench/results-reconstruct-pieces/pieces.py jaccard       # selections against the whole copy's
    python bench/results-reconstruct-pieces/pieces.py compare MQ_BASE MQ_PIECES KL_BASE KL_PIECES

"In pieces": the probe's free cells capped at 2 * n_batch + 1, so ``probing.redecode`` copies the context in
pieces of n_batch tokens that see the context and at most the piece before (what a tight cache does already).
Run from the project root with PYTHONPATH=.:bench.
"""

import collections
import json
import random
import runpy
import sys

import numpy as np

import pykvcompose.probing as probing

WHOLE = probing.redecode
PIECES = {"on": True}


def redecode(engine, tokens, base, free, stage=""):
    if PIECES["on"] and stage == "probe":
        free = min(free, 2 * engine.n_batch + 1)
    return WHOLE(engine, tokens, base, free, stage)


probing.redecode = redecode


def cost(n: int) -> None:
    import llama_cpp
    from cost import first_token_seconds, llama_kwargs
    from speed import haystack_tokens

    from pykvcompose import KVComposePress, Llama
    from pykvcompose.models import default_model_path

    prompt = haystack_tokens()[:n]
    for flash in (False, True):
        kw = llama_kwargs(flash, "f16", n_ctx=2 * n + 256)
        plain = llama_cpp.Llama(default_model_path(), **kw)
        ours = Llama(default_model_path(), kv_compress=KVComposePress(0.75, scoring="reconstruct"), **kw)
        best = collections.defaultdict(lambda: float("inf"))
        for _ in range(2):
            best["plain"] = min(best["plain"], first_token_seconds(plain, prompt))
            for variant in ("whole", "pieces"):
                PIECES["on"] = variant == "pieces"
                best[variant] = min(best[variant], first_token_seconds(ours, prompt))
        print(
            json.dumps(
                {
                    "flash": flash,
                    "n": n,
                    "plain_s": round(best["plain"], 2),
                    **{v: round(best[v] / best["plain"], 3) for v in ("whole", "pieces")},
                }
            ),
            flush=True,
        )
        plain.close()
        ours.close()


def jaccard() -> None:
    from speed import haystack_tokens

    from pykvcompose import KVComposePress, Llama
    from pykvcompose.models import default_model_path
    from pykvcompose.streaming import question_agnostic

    tokens = haystack_tokens()
    for n in (1500, 4096):
        llm = Llama(default_model_path(), n_ctx=2 * n + 256, n_batch=512, verbose=False)
        for start in (0, 9000, 20000):
            sel = {}
            for variant in ("whole", "pieces"):
                PIECES["on"] = variant == "pieces"
                probe = llm.kv_probe(tokens[start : start + n], [question_agnostic(KVComposePress(0.75))])
                for r in (0.75, 0.875):
                    press = question_agnostic(KVComposePress(r))
                    sel[variant, r] = press.compress(probe, press.n_kept(n))[2]
            for r in (0.75, 0.875):
                a, b = sel["whole", r], sel["pieces", r]
                j = [
                    len(set(x) & set(y)) / len(set(x) | set(y))
                    for x, y in zip(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]))
                ]
                print(
                    json.dumps(
                        {
                            "n": n,
                            "text_at": start,
                            "ratio": r,
                            "jaccard_mean": round(float(np.mean(j)), 3),
                            "jaccard_min": round(float(np.min(j)), 3),
                        }
                    ),
                    flush=True,
                )
        llm.close()


def compare(mq_whole, mq_pieces, kl_whole, kl_pieces) -> None:
    from kvbench.stats import mcnemar_exact

    def facts(path):
        return {
            (r["style"], r["press"], r["ratio"], r["seed"], r["question"]): r["correct"]
            for r in map(json.loads, open(path))
            if r["mode"] == "independent"
        }

    a, b = facts(mq_whole), facts(mq_pieces)
    cells = collections.defaultdict(list)
    for key, v in b.items():
        if key in a:
            cells[key[:3]].append((a[key], v))
    for cell, pairs in sorted(cells.items()):
        x, y = [p[0] for p in pairs], [p[1] for p in pairs]
        print(f"{cell}: whole {sum(x)}, pieces {sum(y)} of {len(pairs)}, p={mcnemar_exact(x, y):.3f}")

    def kl(path):
        return {
            (r["press"], r["ratio"], r["seed"]): (r["kl"], r["top1"])
            for r in map(json.loads, open(path))
            if r["model"] == "smollm2-135m" and r["press"] != "full"
        }

    a, b = kl(kl_whole), kl(kl_pieces)
    for cell in sorted({k[:2] for k in b}):
        seeds = sorted(k[2] for k in b if k[:2] == cell and k in a)
        x, y = [a[cell + (s,)][0] for s in seeds], [b[cell + (s,)][0] for s in seeds]
        rng = random.Random(0)
        boot = sorted(
            sum(y[i] for i in idx) / sum(x[i] for i in idx)
            for idx in ([rng.randrange(len(seeds)) for _ in seeds] for _ in range(2000))
        )
        print(
            f"{cell}: KL whole {np.mean(x):.4f}, pieces {np.mean(y):.4f}, ratio {sum(y) / sum(x):.3f} "
            f"({boot[50]:.3f}-{boot[1949]:.3f}), {len(seeds)} contexts"
        )


if __name__ == "__main__":
    command, args = sys.argv[1], sys.argv[2:]
    if command == "run":
        sys.argv = args
        runpy.run_path(args[0], run_name="__main__")
    elif command == "cost":
        cost(int(args[0]) if args else 4096)
    elif command == "jaccard":
        jaccard()
    elif command == "compare":
        compare(*args)
