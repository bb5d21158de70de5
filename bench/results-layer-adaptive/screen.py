# ruff: noqa: E402
"""The authors' layer-adaptive KVCompose on the multi-query set (issue 32's anchor), emulated exactly by masking.

llama.cpp keeps one cell count for every layer, so kvpress's structured ``KVComposePress`` (each layer l keeps its
budget B_l of tokens, each kv head its own top B_l by score) cannot be written into a llama.cpp cache. It can be
*emulated*: a second, plain ``llama_cpp.Llama`` (flash attention off) holds the full cache, and an eval callback
sets to -inf the raw scores ``kq-{il}`` (``[n_kv, n_tokens, n_head]``, before ``soft_max_ext``) of every context
cell that (layer, kv head) did not keep. Attention over a masked cache equals attention over the pruned one (the
kept keys and values are the prefill's own, at their original positions), so the answers are what per-(layer, head)
eviction with the paper's budgets gives. This is a measuring oracle, not a product path (it saves no memory).

Variants per ratio, all decoded on the same masked context, scores from one reconstruct probe of our ``Llama``:
- pub: KVCompose as published with uniform cells (``KVComposePress(r, scoring="reconstruct")``, the selection
  ``kv_apply`` writes): the check that masking reproduces the composite cells' answers;
- publayers: the same scores with the paper's per-layer budgets (``layer_budgets``, kvpress ``structured=True``);
- pubheads: kvpress's unstructured variant (a budget per (layer, kv head): the top scores over all heads);
- shipped: ``compress_context``'s selection (uniform cells);
- flatall, flatnum (diagnostics): the shipped selection with the layers whose paper budget exceeds the cells keeping
  every token (flatall) or, within the cells, the magic numbers' sentences first (flatnum, an oracle's knowledge);
  flat1820: layers 18 and 20 alone keep every token; flatstride: in the flat layers the sinks, the newest tokens and
  the rest spread evenly over the context (every head alike); flatnumstride: the same with the numbers' sentences;
  flatpriorNN: the prior's top sentences (up to NN% of the cells, ``multi_query.top_sentences``) first; flattopNN and
  flattopnum: flatpriorNN and flatnum only in the layers whose budget is at least 3/4 of the largest;
  records of all in flat.jsonl (seeds 100-111, completion);
and the full cache (ratio 0, no mask). On seed 0 (completion) the pub and shipped answers equal the composite cells'
(bench/results-prior-share/tails-tables.jsonl, bench/results-merge/colon-tables.jsonl) text for text.

From the project root: ``python bench/results-layer-adaptive/screen.py`` with S0/S1 (seeds; the tables' are 0-29),
VARIANTS, STYLES, RATIOS and OUT in the environment; ``BASE=pub python bench/results-prior-share/report.py OUT``.
"""

import contextlib
import ctypes
import os
import sys

import llama_cpp
import numpy as np

sys.path[:0] = ["bench", "."]
import multi_query as mq

from pykvcompose import KVComposePress, Llama
from pykvcompose.models import default_model_path
from pykvcompose.presses.base_press import SINK_TOKENS
from pykvcompose.presses.kvcompose_press import recent_tokens
from pykvcompose.streaming import question_agnostic

ratios = [float(r) for r in os.environ.get("RATIOS", "0.75,0.875").split(",")]
VARIANTS = os.environ.get("VARIANTS", "pub,publayers,pubheads,shipped").split(",")
S0, S1 = int(os.environ.get("S0", 0)), int(os.environ.get("S1", 30))
STYLES = os.environ.get("STYLES", "completion,chat").split(",")
N_CTX = 3600
ours = Llama(default_model_path(), n_ctx=N_CTX, n_batch=512, verbose=False)


class Tensor(ctypes.Structure):
    """The head of ggml's ``struct ggml_tensor`` (ggml.h of the vendored llama.cpp) up to its name."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * 4),
        ("nb", ctypes.c_size_t * 4),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * 16),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * 10),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * 64),
    ]


class MaskedLlama(llama_cpp.Llama):
    """A plain llama-cpp-python ``Llama`` whose attention over the first ``n`` cells follows ``drop``: a bool
    array (layers, heads, n), True where that query head's layer no longer holds the cell. None: the full cache."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.drop = None
        self._cb = llama_cpp.ggml_backend_sched_eval_callback(self._eval)
        self.context_params.cb_eval = self._cb
        self._ctx.close()
        self._ctx = self._stack.enter_context(
            contextlib.closing(
                llama_cpp._internals.LlamaContext(model=self._model, params=self.context_params, verbose=False)
            )
        )

    def _eval(self, tensor, ask, _user_data):
        t = Tensor.from_address(tensor)
        if not t.name.startswith(b"kq-"):
            return not ask
        if ask:
            return self.drop is not None
        drop = self.drop[int(t.name[3:])]
        n_kv, n_tokens, n_head = t.ne[0], t.ne[1], t.ne[2]
        if t.type != 0 or t.nb[1] != 4 * n_kv or n_head != drop.shape[0] or t.ne[3] != 1:
            raise SystemExit(f"unexpected kq tensor: type {t.type}, ne {list(t.ne)}, nb {list(t.nb)}")
        kq = np.ctypeslib.as_array((ctypes.c_float * (n_kv * n_tokens * n_head)).from_address(t.data))
        kq = kq.reshape(n_head, n_tokens, n_kv)
        np.copyto(kq[:, :, : drop.shape[1]], -np.inf, where=drop[:, None, :])
        return True


plain = MaskedLlama(
    default_model_path(), n_ctx=N_CTX, n_batch=512, n_threads=ours.n_threads, flash_attn=False, verbose=False
)


QUESTIONS = []  # the current fact document's questions, for the diagnostics that need its numbers' positions
_fact_document = mq.fact_document


def _remember_questions(*args, **kwargs):
    context, questions = _fact_document(*args, **kwargs)
    QUESTIONS[:] = [questions]
    return context, questions


mq.fact_document = _remember_questions


def drop_of(keep, n_head, n):
    """(layers, heads, n) True where a query head's kv head did not keep the cell; ``keep[l][g]``: kept indices."""
    n_layer, n_head_kv = len(keep), len(keep[0])
    drop = np.ones((n_layer, n_head, n), dtype=bool)
    group = n_head // n_head_kv
    for il in range(n_layer):
        for g in range(n_head_kv):
            drop[il, g * group : (g + 1) * group, keep[il][g]] = False
    return drop


def per_head_budgets(scores, ratio):
    """kvpress's unstructured budgets: the top ``n_layer * n_kv * n * (1 - ratio)`` sorted scores over all heads."""
    n_layer, n_head_kv, n = scores.shape
    ordered = -np.sort(-scores, axis=-1).reshape(-1)
    n_total = max(1, int(ordered.size * (1 - ratio)))
    top = np.argpartition(-ordered, n_total - 1)[:n_total] // n
    return np.bincount(top, minlength=n_layer * n_head_kv).reshape(n_layer, n_head_kv)


def compressed(ctx, apply_each, full=None):
    """Probe ``ctx`` on ``ours``; prefill it on ``plain``; ``full()`` then ``apply_each`` under each mask."""
    n = len(ctx)
    ours.kv_compress = None
    ours.reset()
    probe = ours.kv_probe(ctx, [KVComposePress(0.75, scoring="reconstruct", self_information=True)])
    base = ours.save_state()
    n_head = probe.n_head
    # the fact styles (no ``full``): where the numbers' digits are, for the diagnostics that force their sentences
    numbers = list(mq.number_tokens(ours, ctx, QUESTIONS[0]).values()) if full is None else []
    plain.drop = None
    plain.reset()
    plain.eval(ctx)
    if full is not None:
        full()
    else:  # the fact styles: the full cache's answers on this same context, as a row
        apply_each(0.0, "full")
    for ratio in ratios:
        published = KVComposePress(ratio, scoring="reconstruct")
        scores = published.score(probe)
        order = np.argsort(-scores, axis=-1, kind="stable")
        for v in VARIANTS:
            if v in ("pub", "shipped"):
                ours.load_state(base)
                ours.kv_apply(published if v == "pub" else question_agnostic(KVComposePress(ratio)), probe)
                keep = ours._engine.conv.selection
            elif v in ("publayers", "pubheads"):  # each (layer, kv head) keeps its top budget: per layer or per head
                per_layer = v == "publayers"
                budgets = published.layer_budgets(scores)[:, None] if per_layer else per_head_budgets(scores, ratio)
                budgets = np.broadcast_to(budgets, scores.shape[:2])
                keep = [[order[il, g, : budgets[il, g]] for g in range(scores.shape[1])] for il in range(len(budgets))]
            elif v.startswith("flat"):  # diagnostics: the shipped selection, its flat layers changed
                # flatall: the layers whose paper budget exceeds the cells keep every token (more than the cells:
                # the upper bound of fixing those layers alone); flatnum: there the magic numbers' whole sentences
                # (an oracle's knowledge) first, the shipped ranking after, within the cells
                shipped = question_agnostic(KVComposePress(ratio))
                fused = shipped.score(probe)
                c = shipped.n_kept(n)
                sel = shipped.select(fused, c)
                budgets = published.layer_budgets(scores)
                flat = budgets > c
                if v == "flat1820":
                    flat = np.isin(np.arange(len(sel)), [18, 20])
                if "top" in v:  # flattopNN / flattopnum: only the layers whose budget is >= 3/4 of the largest
                    flat = budgets >= 0.75 * budgets.max()
                needles = np.isin(probe.sentences, probe.sentences[np.concatenate(numbers)] if numbers else [])
                keep, cover = [], []  # cover: the share of the needles' tokens the prior's sentences force
                for il in range(len(sel)):
                    if not flat[il]:
                        keep.append(list(sel[il]))
                    elif v in ("flatall", "flat1820"):
                        keep.append([np.arange(n)] * len(sel[il]))
                    elif v.startswith("flatprior") or v.startswith("flattop") and v != "flattopnum":
                        # the prior's top sentences (up to NN% of the cells) first
                        share = int(v[9:] if v.startswith("flatprior") else v[7:]) / 100
                        top = mq.top_sentences(probe.sentence_information(), probe.sentences, share * c)
                        cover.append(float(needles[top].sum() / needles.sum()))
                        ranked = np.argsort(-(fused[il] + 16.0 * top), axis=-1, kind="stable")
                        keep.append(list(ranked[:, :c]))
                    elif v.endswith("stride"):  # sinks, newest (and the needles), the rest spread evenly
                        forced = (np.arange(n) < SINK_TOKENS) | (np.arange(n) >= n - recent_tokens(n, ratio))
                        forced |= needles if v == "flatnumstride" else False
                        rest = np.nonzero(~forced)[0]
                        spread = rest[np.linspace(0, len(rest) - 1, max(0, c - forced.sum())).round().astype(int)]
                        keep.append([np.union1d(np.nonzero(forced)[0], spread)] * len(sel[il]))
                    else:  # flatnum, flattopnum
                        ranked = np.argsort(-(fused[il] + 16.0 * needles), axis=-1, kind="stable")
                        keep.append(list(ranked[:, :c]))
                if cover:
                    print(v, ratio, "needle tokens forced", f"{np.mean(cover):.2f}", flush=True)
            else:
                raise SystemExit(f"unknown variant {v}")
            plain.drop = drop_of(keep, n_head, n)
            apply_each(ratio, v)
            plain.drop = None


def main():
    out = open(os.environ.get("OUT", "bench/results-layer-adaptive/layers.jsonl"), "a")
    mq.screen_variants(plain, compressed, range(S0, S1), STYLES, out)


if __name__ == "__main__":
    main()
