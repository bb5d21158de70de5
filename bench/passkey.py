"""Pass-key retrieval with statistical power: every press on the same prompts, in one run.

    python bench/passkey.py [--tokens 1500] [--cases 20] [--style completion chat]
                            [--ratios 0.5 0.75 0.875] [--presses kvcompose,scoring=reconstruct kvcompose snapkv ...]
                            [--model gemma3-270m] [--out bench/runs/passkey]

Each case is a ~``--tokens`` document with a pass key at a depth spread evenly over 0.05-0.95 (a
different key and stretch of text per case), asked in two prompt styles: "completion" (ends with
"What is the pass key? The pass key is") and "chat" (SmolLM2's chat template, the assistant's turn
opened). The prompt is compressed whole, all but its last token, as ``llm(prompt)`` does.

Each case's prompt is prefilled and probed once (``Llama.kv_probe``); every (press, ratio) is applied
to a restored copy of that cache (``Llama.kv_apply``) and answered greedily, so all rows are paired on
the same prompts. Scores are counts with Wilson 95% intervals; "p vs full" and "p vs paper" are exact
McNemar tests against the full cache and against the published KVCompose (the first ``--presses``
entry) on the same cases: a row is better or worse only where p < 0.05.

--oracle adds, for every press, a row where the pass key's sentence ("The pass key is K. Remember it.
K is the pass key.") is forced into every (layer, kv head), counted in C: an upper bound for any
selection that finds the fact, which tells how much of a loss is selection and how much is the rest of
the compressed cache. It is a measurement, not a press.

A press spec is NAME[,key=value...] (see ``pykvcompose.presses.parse_press_spec``; the ratio is added).
--model takes a label of the benchmark's model table (smollm2-135m, gemma3-270m) or a GGUF path. On
Gemma 3 (interleaved sliding-window attention) only the global layers' cache is compressed.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import pathlib
import time

import numpy as np

from kvbench.haystack import passkey_cases, passkey_chat_prompt
from kvbench.runner import MODELS
from kvbench.stats import count_with_interval, mcnemar_exact
from pykvcompose import Llama
from pykvcompose.demo import answer
from pykvcompose.presses import parse_press_spec

# KVCompose as published first (the reference of "p vs paper"), then KVComposePress's default (its lookahead)
# (the rows for head_consensus, span, protect_tail and starved_layers, removed as no gain, are in
# docs/ablations.md with the commit that last ran them)
PRESSES = ["kvcompose,scoring=reconstruct", "kvcompose", "snapkv", "tova", "streaming_llm"]


def press_for(spec: str, ratio: float):
    name, _, rest = spec.partition(",")
    return parse_press_spec(f"{name}:{ratio}" + (f",{rest}" if rest else ""))


def needle_forced(press, positions):
    """``press`` with the cache positions ``positions`` kept by every (layer, kv head), counted in C
    (the oracle row)."""
    oracle = copy.copy(press)
    compress = press.compress
    oracle.compress = lambda probe, n_keep, forced=(): compress(probe, n_keep, sorted(set(forced) | set(positions)))
    return oracle


def needle_positions(tokenize, text: str, key: int) -> range:
    """Token positions of the pass key's sentence in ``tokenize(text)`` (it follows a paragraph break, so the
    tokens before it are the prefix's own)."""
    at = text.index(f"The pass key is {key}.")
    end = text.index(f"{key} is the pass key.", at) + len(f"{key} is the pass key.")
    return range(len(tokenize(text[:at])), len(tokenize(text[:end])))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=1500)
    p.add_argument("--cases", type=int, default=20, help="cases per prompt style (depths spread over 0.05-0.95)")
    p.add_argument("--style", nargs="+", default=["completion", "chat"], choices=["completion", "chat"])
    p.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.75, 0.875])
    p.add_argument("--presses", nargs="+", default=PRESSES, help="press specs NAME[,key=value...]")
    p.add_argument("--model", default="smollm2-135m", help=f"one of {sorted(MODELS)} or a GGUF path")
    p.add_argument("--max-tokens", type=int, default=16, help='enough for "The pass key is NNNNN."')
    p.add_argument("--oracle", action="store_true", help="add each press with the pass key's sentence forced")
    p.add_argument("--out", default="bench/runs/passkey")
    a = p.parse_args()
    if a.cases < 1:
        p.error("--cases must be >= 1")
    presses = {(spec, r): press_for(spec, r) for spec in a.presses for r in a.ratios}  # refuse bad specs first
    rows = a.presses + [f"{spec} +needle" for spec in a.presses if a.oracle]
    path = a.model if os.path.isfile(a.model) else MODELS[a.model]()
    llm = Llama(path, n_ctx=2 * a.tokens + 256, n_batch=512, verbose=False)
    tok = lambda s: llm.tokenize(s.encode(), add_bos=False)  # noqa: E731
    depths = list(np.round(np.linspace(0.05, 0.95, a.cases), 3))
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    found: dict = {}  # (style, spec, ratio) -> [bool per case]
    answers: dict = {}  # (style, spec, ratio) -> [answer's start per case]
    t0 = time.perf_counter()
    # special=True: the chat template's markers are its special tokens, not their spelling as text
    tokenize = lambda s: llm.tokenize(s.encode(), special=True)  # noqa: E731
    for style in a.style:
        for depth, key, prompt in passkey_cases(tok, a.tokens, depths):
            text = passkey_chat_prompt(llm, prompt) if style == "chat" else prompt
            toks = tokenize(text)
            context = toks[:-1]
            needle = needle_positions(tokenize, text, key)
            assert llm.detokenize(toks[needle.start : needle.stop]).decode().strip().startswith("The pass key is"), (
                needle
            )
            llm.kv_compress = None
            probe = llm.kv_probe(context, list(presses.values()))
            state = llm.save_state()
            row = []
            oracles = [
                ((f"{spec} +needle", r), needle_forced(p, needle)) for (spec, r), p in presses.items() if a.oracle
            ]
            for (spec, ratio), press in [(("full cache", 0.0), None)] + list(presses.items()) + oracles:
                llm.load_state(state)
                if press is not None:
                    llm.kv_apply(press, probe)
                text = answer(llm, toks, a.max_tokens)["text"]
                ok = str(key) in text
                found.setdefault((style, spec, ratio), []).append(ok)
                answers.setdefault((style, spec, ratio), []).append(text.strip()[:24])
                row.append("Y" if ok else ".")
            print(
                f"{style:10s} depth {depth:.2f} ({len(toks)} tokens): {''.join(row)} | {time.perf_counter() - t0:.0f}s",
                flush=True,
            )
    llm.close()

    n = a.cases
    lines = [
        f"Pass key in ~{a.tokens}-token prompts, {n} cases per prompt style (depths 0.05-0.95), {a.model}, "
        f"{time.perf_counter() - t0:.0f} s in one run. Each cell: found / cases (Wilson 95% interval); "
        f"p: exact McNemar test on the same cases against the full cache and against the published "
        f"KVCompose (`{a.presses[0]}`) at the same ratio.",
        "",
    ]
    for style in a.style:
        full = found[(style, "full cache", 0.0)]
        lines += [
            f"**{style}** prompts: full cache {count_with_interval(sum(full), n)}",
            "",
            "| press | " + " | ".join(f"{r} found | p vs full | p vs paper" for r in a.ratios) + " |",
            "|---|" + "---:|---:|---:|" * len(a.ratios),
        ]
        for spec in rows:
            cells = []
            for r in a.ratios:
                f, paper = found[(style, spec, r)], found[(style, a.presses[0], r)]
                vs_paper = "" if spec == a.presses[0] else f"{mcnemar_exact(f, paper):.2f}"
                cells.append(f"{count_with_interval(sum(f), n)} | {mcnemar_exact(f, full):.2f} | {vs_paper}")
            lines.append(f"| {spec} | " + " | ".join(cells) + " |")
        lines.append("")
    (out / "results.md").write_text("\n".join(lines))
    (out / "results.json").write_text(
        json.dumps(
            {
                "tokens": a.tokens,
                "depths": depths,
                "model": a.model,
                **{
                    what: {"|".join(map(str, k)): v for k, v in d.items()}
                    for what, d in (("found", found), ("answers", answers))
                },
            },
            indent=1,
        )
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
