"""KVCompose: attention-guided, layer-adaptive composite tokens."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import _native
from ..probe import Probe, ProbeKind, ProbeSpec
from .base_press import SINK_TOKENS, BasePress, check_bool, check_choice, check_int

AGGREGATIONS = ("max", "mean")
#: Share of the kept cells that ``self_information`` gives the context's newest tokens in every head (not in the
#: paper): the text that follows a compressed context attends to them, and neither the reconstruct probe nor the
#: prior values them (docs/quality.md, "One cache, many questions": 0.12 screened against 64 tokens and the window
#: probe's rank).
RECENT_SHARE = 0.12
SCORINGS = ("auto", "lookahead", "reconstruct", "window")


@dataclass
class KVComposePress(BasePress):
    """
    KVCompose on llama.cpp: each (layer, kv head) keeps its top-C tokens by probe attention, aligned into
    C composite cells (every head of a cell may hold a different original token).

    Based on KVCompose (https://arxiv.org/abs/2509.05165), with the fields of NVIDIA kvpress's
    ``KVComposePress`` (``structured`` is always True here: llama.cpp's cells are uniform).

    Parameters
    ----------
    compression_ratio : float, default=0.0
        Fraction of the prompt's KV cells removed, in [0, 1) (0.75 keeps a quarter).
    agg_task : {"max", "mean"}, default="max"
        Aggregation over the probe queries, per query head.
    agg_group : {"max", "mean"}, default="mean"
        Aggregation over the query heads of a GQA group: one score per kv head.
    agg_head : {"max", "mean"}, default="mean"
        Aggregation over kv heads of the r-th largest scores, which drives the paper's layer allocation
        (``layer_budgets``; reported in ``kv_stats``: llama.cpp gives every layer the same cells).
    add_v_norm : bool, default=False
        Multiply each token's score by the L2 norm of its value vector.
    add_mean_across_heads : bool, default=True
        Add the mean over a layer's kv heads to each head's scores (stabiliser).
    keep_token_lower_bound : int, default=0
        Minimum tokens of each layer in the layer allocation.
    scoring : {"auto", "lookahead", "reconstruct", "window"}, default="auto"
        The probe queries. "reconstruct": the context fed again after itself (the paper's probe; a
        second prefill): KVCompose as published. "window": the prompt's last ``window`` tokens (no extra
        pass). "lookahead" (not in the paper): the first ``lookahead`` tokens the model writes greedily
        after the prompt, decoded on the full cache and removed, which query it as the answer will
        (pseudo queries as in Lookahead Q-Cache, https://arxiv.org/abs/2505.20334). "auto" (not in the
        paper): the lookahead for prompts, whose end asks what the answer needs; for ``compress_context``
        (question-agnostic) the reconstruct probe, with ``self_information`` from a ratio of 0.5 on; the
        reconstruct probe for the chunks of prompts longer than the cache.
    window : int, default=64
        Queries of ``scoring="window"``, and the newest tokens that re-score a full cache otherwise.
    lookahead : int, default=32
        Queries of the lookahead probe (fewer when the model ends its answer or the cache is full).
    min_tokens : int, default=128
        Prompts shorter than this are not compressed.
    self_information : bool, default=False
        (not in the paper) Rank each head's tokens by its probe score plus the self-information of the
        token's sentence: the most ``-log p(token | earlier tokens)`` of any token in it, measured from
        the prefill's logits (Selective Context, https://arxiv.org/abs/2310.06201, keeps sentences by
        self-information). The two ranks, each scaled to [0, 1], are added; the first
        ``SINK_TOKENS`` (4) tokens, the attention sinks of StreamingLLM (https://arxiv.org/abs/2309.17453),
        and the newest ``RECENT_SHARE`` (12%) of the kept cells' worth of tokens rank above every other token
        in every head; after those, in each layer whose paper budget (``layer_budgets``) fits the kept cells,
        each head's top budget by the probe score. For ``compress_context``
        (question-agnostic): a probe of the context alone values every token it must copy alike, and
        the sentence prior keeps the ones the model could not have guessed (a number, a name). There,
        at 0.5, 0.75 and 0.875, it finds more facts than the published selection at about its KL divergence
        from the full cache (docs/quality.md, "One cache, many questions"), so ``scoring="auto"`` turns it
        on there from 0.5 on; ``scoring="reconstruct"`` alone is KVCompose as
        published.
        Measured where a prompt or context is prefilled whole; the compressions that make room in a
        cache streamed past ``n_ctx`` rank by the probe alone.
    per_head : bool, default=True (keyword only)
        False: the same tokens in every layer and head, evicted by llama.cpp (see ``BasePress``).
    """

    agg_task: str = "max"
    agg_group: str = "mean"
    agg_head: str = "mean"
    add_v_norm: bool = False
    add_mean_across_heads: bool = True
    keep_token_lower_bound: int = 0
    scoring: str = "auto"
    window: int = 64
    lookahead: int = 32
    min_tokens: int = 128
    self_information: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("agg_task", self.agg_task, AGGREGATIONS)
        check_choice("agg_group", self.agg_group, AGGREGATIONS)
        check_choice("agg_head", self.agg_head, AGGREGATIONS)
        check_choice("scoring", self.scoring, SCORINGS)
        check_bool("add_v_norm", self.add_v_norm)
        check_bool("add_mean_across_heads", self.add_mean_across_heads)
        check_bool("self_information", self.self_information)
        check_int("keep_token_lower_bound", self.keep_token_lower_bound, 0)
        check_int("window", self.window, 1)
        check_int("lookahead", self.lookahead, 1)
        check_int("min_tokens", self.min_tokens, 2)

    def probe(self) -> ProbeSpec:
        """The probe ``scoring`` names ("auto": the lookahead; ``compress_context`` and streamed chunks
        use the reconstruct probe instead, see :func:`pykvcompose.streaming.question_agnostic`)."""
        if self.scoring == "window":
            return ProbeSpec(ProbeKind.WINDOW, self.window)
        if self.scoring in ("auto", "lookahead"):
            return ProbeSpec(ProbeKind.LOOKAHEAD, self.lookahead)
        return ProbeSpec(ProbeKind.RECONSTRUCT, 0)

    def reads_self_information(self) -> bool:
        return self.self_information

    def head_scores(self, probe: Probe) -> np.ndarray:
        """Probe attention per query head, float32 (layers, heads, tokens), reduced over the probe queries
        by ``agg_task``."""
        return probe.head_scores(self.probe(), self.agg_task)

    def score(self, probe: Probe) -> np.ndarray:
        """
        Token scores from probe attention.

        Parameters
        ----------
        probe : Probe
            Attention of this press's probe; value norms when ``add_v_norm`` is set. Query head h
            belongs to kv head h // (heads // kv_heads).

        Returns
        -------
        np.ndarray, float32 (layers, kv_heads, tokens)
        """
        value_norms = probe.value_norms() if self.add_v_norm else None
        scores = _native.kvcompose_score(
            self.head_scores(probe),
            probe.n_head_kv,
            self.agg_group,
            value_norms,
            self.add_mean_across_heads,
        )
        if not self.self_information or probe.self_information is None:
            return scores  # (compressions that make room have no prefill logits: the probe score alone)
        own, n = ranks(scores), scores.shape[-1]
        fused = own + ranks(probe.sentence_information())
        # where the paper's budget of a layer fits the uniform cells, each head's own top budget by the probe
        # (what the authors' layer-adaptive KVCompose keeps there) ahead of the summed ranks: a lower KL
        # divergence from the full cache than the summed ranks alone, and as many facts (docs/quality.md)
        budgets = self.layer_budgets(scores)[:, None, None]
        fits = budgets <= n * (1 - self.compression_ratio)
        fused += 4.0 * ((own >= 1 - budgets / n) & fits)
        # the attention sinks ahead of everything: they carry little self-information, and without them
        # the summed ranks dropped a chat template's opening in some heads (degenerate answers at 0.875)
        fused[..., :SINK_TOKENS] += 8.0
        # and the newest tokens, which what follows the context attends to: without them the prior's KL
        # divergence from the full cache was 1.35-1.46x the published selection's on the embedded model
        fused[..., n - recent_tokens(n, self.compression_ratio) :] += 8.0
        return fused.astype(np.float32)

    def layer_budgets(self, scores: np.ndarray) -> np.ndarray:
        """
        The paper's global allocation of kept tokens across layers.

        Parameters
        ----------
        scores : np.ndarray, float32 (layers, kv_heads, tokens)

        Returns
        -------
        np.ndarray, int32 (layers,)
            Tokens per layer summing to about ``layers * tokens * (1 - compression_ratio)``.
            llama.cpp keeps one cell count for all layers, so these are reported, not applied.
        """
        n_layer, _, n = scores.shape
        n_total = max(1, int(n_layer * n * (1 - self.compression_ratio)))
        return _native.kvcompose_layer_budgets(scores, n_total, self.agg_head, self.keep_token_lower_bound)


def recent_tokens(n_tokens: int, compression_ratio: float) -> int:
    """The newest of ``n_tokens`` that ``self_information`` keeps in every head: ``RECENT_SHARE`` of the cells
    the ratio keeps, ``n_tokens * (1 - compression_ratio)``, rounded."""
    return round(RECENT_SHARE * n_tokens * (1 - compression_ratio))


def ranks(values: np.ndarray) -> np.ndarray:
    """Each value's rank along the last axis scaled to [0, 1] (ties: the later position ranks higher)."""
    order = np.argsort(values, axis=-1, kind="stable")
    return np.argsort(order, axis=-1, kind="stable") / max(values.shape[-1] - 1, 1)
