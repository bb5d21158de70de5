# ruff: noqa: E402
"""Screening, kept with its records: how should the sentence self-information prior join the published
reconstruct score? Facts (multi-query, independent requests) and KL divergence on screening seeds (never
the tables' 0-29). From the project root: ``python bench/results-prior-share/screen.py``, with S0/S1
(seeds), VARIANTS, STYLES, RATIOS and OUT in the environment.

Variants: pub (published), sum (rank + prior rank), sumsinkN (the same with the first N tokens in every
head; sumsink4 was ``self_information=True`` before the newest tokens), sumtailN (sumsink4 and the last N
tokens), sumtailfNN (sumtailN with N = NN% of the kept cells; sumtailf12 is the shipped
``self_information=True``), pubtailN (pub and the last N tokens), pubwin and sumwin (pub and sumsink4 plus the
rank by the scores of the context's last 64 tokens, the window probe read during the prefill), max (the larger
of the two ranks), resNN (each head's own ranking, with the prior's top NN% of the kept cells forced into every
head), sumresNN (the shipped sumtailf12, and the prior's highest whole sentences, up to NN% of the kept cells, in
every head; sumreshNN only in the layers whose paper budget exceeds the uniform cells), buds (in the layers whose
paper budget fits the cells each head's top budget by attention first, the shipped ranks after), budp (buds, and the
prior leading the ranking in the other layers), budsl (buds with the prior of a short window:
``multi_query.local_information``), budshNN and budshlNN (buds with the shipped or the short window's prior's
top sentences, NN% of the cells, first in the layers whose paper budget exceeds the cells; budshgNN: the short
window's forced, the shipped prior in the summed ranks; local*.jsonl), budx (buds, and
the other layers ranked by the mean rank the fitting layers' heads give each token; budxo: plus their own rank), and
with a leading v the same on ``add_v_norm=True`` scores (KVzip+-style attention x value norm); a
leading c ranks every head by the mean of all heads' ranks of the variant after it (the same cells in every head,
as a question-ranked streaming round keeps them), h by its own rank plus that mean.

Its records were made while the prior's sentences also ended at a colon (until af2ac7c)."""

import os
import sys

import numpy as np

sys.path[:0] = ["bench", "."]
import multi_query as mq

from pykvcompose import KVComposePress, Llama
from pykvcompose.models import default_model_path
from pykvcompose.presses.base_press import SINK_TOKENS
from pykvcompose.presses.kvcompose_press import ranks, recent_tokens

ratios = [float(r) for r in os.environ.get("RATIOS", "0.75,0.875").split(",")]
VARIANTS = os.environ.get("VARIANTS", "pub,sum,res10,res25,max").split(",")
S0, S1 = int(os.environ.get("S0", 100)), int(os.environ.get("S1", 112))
STYLES = os.environ.get("STYLES", "completion,chat,kl").split(",")
llm = Llama(default_model_path(), n_ctx=3600, n_batch=512, verbose=False)

VBASE = {}


def fused(v, base, prior, ratio):
    if v.startswith("c") or v.startswith("h"):  # every head ranks by the consensus (h: half its own ranking)
        own = ranks(fused(v[1:], base, prior, ratio))
        consensus = np.broadcast_to(own.mean(axis=(0, 1), keepdims=True), own.shape)
        return consensus if v[0] == "c" else own + consensus
    if v.startswith("v"):
        base, v = VBASE["b"], (v[1:] or "pub")
    if v == "pub":
        return base
    rb, rp = ranks(base), ranks(prior)[None, None, :]
    n = base.shape[-1]
    if v == "sum":
        return rb + rp
    if v.startswith("sumsink"):  # the summed ranks, with the first N tokens kept in every head
        return rb + rp + 2.0 * (np.arange(n) < int(v[7:]))
    if v.startswith("pubtail"):  # the published ranks, and the last N tokens in every head
        return rb + 2.0 * (np.arange(n) >= n - int(v[7:]))
    if v.startswith("sumtail"):  # the summed ranks with their sinks, and the last N tokens in every head
        # sumtailfNN: N is NN% of the kept cells (sumtailf12 is the shipped self_information=True)
        tail = round(int(v[8:]) / 100 * n * (1 - ratio)) if v.startswith("sumtailf") else int(v[7:])
        return rb + rp + 2.0 * ((np.arange(n) < SINK_TOKENS) | (np.arange(n) >= n - tail))
    if v in ("pubwin", "sumwin"):  # plus the rank by the context's last 64 tokens' attention (no extra pass)
        rw = ranks(VBASE["w"])
        return rb + rw if v == "pubwin" else rb + rp + rw + 3.0 * (np.arange(n) < SINK_TOKENS)
    if v == "max":
        return np.maximum(rb, rp)
    if v.startswith("sumres"):  # the shipped ranks, and the prior's top sentences (NN% of the kept cells) in every head
        # sumreshNN: only in the layers whose paper budget (layer_budgets) exceeds the uniform cells
        shipped = fused("sumtailf12", base, prior, ratio)
        high = v.startswith("sumresh")
        forced = 4.0 * top_sentences(prior, VBASE["s"], int(v[7 if high else 6 :]) / 100 * n * (1 - ratio))
        if high:
            budgets = KVComposePress(ratio, scoring="reconstruct").layer_budgets(base)
            forced = forced[None, None, :] * (budgets > n * (1 - ratio))[:, None, None]
        return shipped + forced
    if v.startswith("budsh"):  # buds, and in the layers whose paper budget exceeds the cells the prior's top
        # sentences (budshNN: NN% of the cells; budshlNN: the short window's prior) ahead of the rest
        # (budshgNN: the short window's top sentences forced, the shipped prior in the summed ranks)
        local = v[5] in "lg"
        p = VBASE["l128"] if local else prior
        share = int(v[6 if local else 5 :]) / 100
        budgets = KVComposePress(ratio, scoring="reconstruct").layer_budgets(base)
        forced = mq.top_sentences(p, VBASE["s"], share * n * (1 - ratio))
        high = (budgets > n * (1 - ratio))[:, None, None]
        return fused("buds", base, prior if v[5] == "g" else p, ratio) + 8.0 * (forced[None, None, :] & high)
    if v.startswith("budsl"):  # buds with the prior of a short window: each sentence's most surprising token given
        # only the 128-256 tokens before it (budslW: W..2W), so a fact is as surprising as the first of its kind
        return fused("buds", base, VBASE["l" + (v[5:] or "128")], ratio)
    if v in ("buds", "budp", "budx", "budxo"):  # the paper's layer budgets guide the fusion within uniform cells
        # buds: where a layer's budget fits the cells, each head first keeps its own top budget by attention (what
        # the paper keeps there), then the shipped ranks fill the rest; the other layers (flat attention, nearly every
        # token wanted) as shipped (buds), led by the prior (budp), or ranked by the fitting layers' consensus (budx;
        # budxo: plus their own rank; digits_by_layer.py: the peaked layers hold the needles' digits, the flat ones
        # retrieve)
        shipped = fused("sumtailf12", base, prior, ratio)
        budgets = KVComposePress(ratio, scoring="reconstruct").layer_budgets(base)[:, None, None]
        low = budgets <= n * (1 - ratio)
        buds = shipped + 4.0 * ((rb >= 1 - budgets / n) & low)
        if v == "buds":
            return buds
        edge = 4.0 * ((np.arange(n) < SINK_TOKENS) | (np.arange(n) >= n - recent_tokens(n, ratio)))
        if v == "budp":
            return np.where(low, buds, 2.0 * rp + rb + edge)
        consensus = ranks(ranks(shipped)[low[:, 0, 0]].mean(axis=(0, 1)))[None, None, :]
        return np.where(low, buds, consensus + (rb if v == "budxo" else 0.0) + edge)
    if v.startswith("res"):
        f = int(v[3:]) / 100
        c = n * (1 - ratio)
        return rb + 2.0 * (rp >= 1 - f * c / n)
    raise ValueError(v)


def top_sentences(prior, sentences, budget):
    """(tokens,) True for the sentences of highest ``prior`` (each token holds its sentence's value) whose tokens,
    taken whole in that order, fit in ``budget`` tokens."""
    ids, first, size = np.unique(sentences, return_index=True, return_counts=True)
    keep = np.zeros(len(prior), dtype=bool)
    used = 0
    for k in np.argsort(-prior[first], kind="stable"):
        if used + size[k] > budget:
            break
        keep |= sentences == ids[k]
        used += size[k]
    return keep


def sentence_peak(info, sentences):
    """Each token's sentence's largest ``info`` (what ``Probe.sentence_information`` does with the prefill's)."""
    peak = np.full(sentences.max() + 1, -np.inf)
    np.maximum.at(peak, sentences, info)
    return peak[sentences].astype(np.float32)


def compressed(ctx, apply_each, full=None):
    """Probe ``ctx`` once; ``full()`` on the full cache, then ``apply_each(ratio, variant)`` on each compression."""
    llm.kv_compress = None
    llm.reset()
    p0 = KVComposePress(0.75, scoring="reconstruct", self_information=True)
    pw = KVComposePress(0.75, scoring="window")
    probe = llm.kv_probe(ctx, [p0, pw])
    plain = llm.save_state()
    base = KVComposePress(0.75, scoring="reconstruct").score(probe)
    VBASE["b"] = KVComposePress(0.75, scoring="reconstruct", add_v_norm=True).score(probe)
    VBASE["w"] = pw.score(probe)
    prior = probe.sentence_information()
    VBASE["s"] = probe.sentences
    windows = {int(v[5:] or 128) for v in VARIANTS if v.startswith("budsl")}
    windows |= {128 for v in VARIANTS if v[:6] in ("budshl", "budshg")}
    for w in windows:
        VBASE[f"l{w}"] = sentence_peak(mq.local_information(ctx, w), probe.sentences)
    if full is not None:
        full()
    for ratio in ratios:
        for v in VARIANTS:
            press = KVComposePress(ratio, scoring="reconstruct")
            sc = fused(v, base, prior, ratio).astype(np.float32)
            llm.load_state(plain)
            press.score = lambda probe, sc=sc: sc
            llm.kv_apply(press, probe)
            apply_each(ratio, v)


def main():
    out = open(os.environ.get("OUT", "bench/results-prior-share/shares.jsonl"), "a")
    mq.screen_variants(llm, compressed, range(S0, S1), STYLES, out)


if __name__ == "__main__":
    main()
