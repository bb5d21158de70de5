# ruff: noqa: E402
"""Screening, kept with its records (issue 32): does merging what a head drops into its most similar kept cell
(CaM / D2O style, within uniform cells) keep more of the context than the shipped ``compress_context`` selection?
Facts (multi-query, independent requests) and KL divergence on screening seeds (never the tables' 0-29). From the
project root: ``python bench/results-merge/screen.py`` with S0/S1 (seeds), VARIANTS, STYLES, RATIOS and OUT in the
environment; ``BASE=none python bench/results-prior-share/report.py bench/results-merge/merge.jsonl``.

Every variant keeps the shipped selection (``compress_context``'s press: reconstruct + sentence self-information +
sinks + newest 12%, bench/results-prior-share/screen.py's ``sumtailf12``); the merge then changes the kept cells'
rows, computed here in numpy on the state bytes:
- none: the shipped cells as they are;
- vNN: each dropped token's value goes into the kept cell of the same (layer, kv head) whose key is most similar
  (cosine, keys as cached: after RoPE) when that similarity is above NN/100, the cell's value
  becoming the average weighted by the attention each token received in the reconstruct probe (CaM);
- kvNN: the same for keys too (D2O's merge);
- nocolon: no merge, and the prior's sentences do not end at a colon (found after the merges: the magic numbers'
  digits, after "is:", formed a sentence of their own that the prior ranked low; needle_ranks.py).

Its records were made while the prior's sentences also ended at a colon (until af2ac7c): run again, ``none``
is what ``nocolon`` was."""

import dataclasses
import os
import sys

import numpy as np

sys.path[:0] = ["bench", ".", os.path.dirname(__file__)]
import multi_query as mq
import seqstate

from pykvcompose import KVComposePress, Llama, probing
from pykvcompose.models import default_model_path
from pykvcompose.probe import ProbeKind
from pykvcompose.streaming import question_agnostic

ratios = [float(r) for r in os.environ.get("RATIOS", "0.75,0.875").split(",")]
VARIANTS = os.environ.get("VARIANTS", "none,v00,v50,kv50").split(",")
S0, S1 = int(os.environ.get("S0", 100)), int(os.environ.get("S1", 110))
STYLES = os.environ.get("STYLES", "completion,chat,kl").split(",")
llm = Llama(default_model_path(), n_ctx=3600, n_batch=512, verbose=False)
engine = llm._engine


def merged(plain, composed, selection, attention, variant):
    """``composed`` (state bytes of the kept cells) with the dropped tokens' rows merged in, per ``variant``."""
    if variant == "none":
        return composed
    keys_too = variant.startswith("kv")
    threshold = int(variant.lstrip("kv")) / 100
    _, K0, V0, _ = seqstate.parse(bytearray(plain))
    out = bytearray(composed)
    _, K1, V1, _ = seqstate.parse(out)
    n_layer, n_head_kv, n_keep = selection.shape
    group = attention.shape[1] // n_head_kv
    for il in range(n_layer):
        dk, dv = K0[il].shape[1] // n_head_kv, V0[il].shape[1] // n_head_kv
        for g in range(n_head_kv):
            keys = K0[il][:, g * dk : (g + 1) * dk].astype(np.float32)
            values = V0[il][:, g * dv : (g + 1) * dv].astype(np.float32)
            w = attention[il, g * group : (g + 1) * group].sum(axis=0).astype(np.float64) + 1e-12
            kept = selection[il, g]
            dropped = np.setdiff1d(np.arange(keys.shape[0]), kept)
            unit = keys / np.maximum(np.linalg.norm(keys, axis=1, keepdims=True), 1e-12)
            sim = unit[dropped] @ unit[kept].T
            slot, best = sim.argmax(axis=1), sim.max(axis=1)
            go = best > threshold
            slot, dropped = slot[go], dropped[go]
            mass = w[kept].copy()
            np.add.at(mass, slot, w[dropped])
            v = values[kept] * w[kept, None]
            np.add.at(v, slot, values[dropped] * w[dropped, None])
            V1[il][:, g * dv : (g + 1) * dv] = v / mass[:, None]
            if keys_too:
                k = keys[kept] * w[kept, None]
                np.add.at(k, slot, keys[dropped] * w[dropped, None])
                K1[il][:, g * dk : (g + 1) * dk] = k / mass[:, None]
    return bytes(out)


def compressed(ctx, apply_each, full=None):
    """Probe ``ctx`` once; ``full()`` on the full cache, then ``apply_each(ratio, variant)`` on each compression."""
    llm.kv_compress = None
    llm.reset()
    probe = llm.kv_probe(ctx, [KVComposePress(0.75, scoring="reconstruct", self_information=True)])
    plain_state, plain = llm.save_state(), engine.seq_bytes()
    attention = probe.measured(ProbeKind.RECONSTRUCT)[1]["mean"]
    if full is not None:
        full()
    for ratio in ratios:
        for v in VARIANTS:
            llm.load_state(plain_state)
            llm.kv_apply(shipped(ratio), colon_free(probe, ctx) if v == "nocolon" else probe)
            composed, selection = engine.seq_bytes(), engine.conv.selection.copy()
            merge = "none" if v == "nocolon" else v
            assert engine.set_seq_bytes(merged(plain, composed, selection, attention, merge))
            apply_each(ratio, v)


def shipped(ratio):
    """The press ``compress_context`` applies at ``ratio`` (``KVComposePress(ratio)`` made question-agnostic)."""
    return question_agnostic(KVComposePress(ratio))


def colon_free(probe, ctx):
    """``probe`` with sentences that do not end at a colon (the value after a label stays in its label's sentence)."""
    ends = probing.SENTENCE_ENDS
    probing.SENTENCE_ENDS = ends - {ord(":")}
    try:
        return dataclasses.replace(probe, sentences=probing.sentences(engine, ctx))
    finally:
        probing.SENTENCE_ENDS = ends


def main():
    out = open(os.environ.get("OUT", "bench/results-merge/merge.jsonl"), "a")
    mq.screen_variants(llm, compressed, range(S0, S1), STYLES, out)


if __name__ == "__main__":
    main()
