"""KVCompose: attention-guided, layer-adaptive composite tokens."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .. import _native
from ..probe import QUESTION_TOKENS_KEPT, Probe, ProbeSpec
from .base_press import BasePress, check_bool, check_choice, check_int, check_number

AGGREGATIONS = ("max", "mean")
STARVED_LAYER_RANKINGS = ("own", "consensus")
SCORINGS = ("auto", "lookahead", "reconstruct", "window")


@dataclass
class KVComposePress(BasePress):
    """
    KVCompose on llama.cpp: per (layer, kv head) top-C tokens from probe attention, aligned into
    C composite cells (every head of a cell may hold a different original token).

    Based on KVCompose (https://arxiv.org/abs/2509.05165), with the fields of NVIDIA kvpress's
    ``KVComposePress``.

    Parameters
    ----------
    compression_ratio : float, default=0.0
        Fraction of the prompt's KV cells removed, in [0, 1).
    agg_task : {"max", "mean"}, default="max"
        Aggregation over the probe queries, per query head.
    agg_group : {"max", "mean"}, default="mean"
        Aggregation over the query heads of a GQA group, giving one score per kv head.
    agg_head : {"max", "mean"}, default="mean"
        Aggregation over kv heads of the r-th largest scores: the composite score of rank r,
        which drives the paper's global layer allocation (``layer_budgets``).
    add_v_norm : bool, default=False
        Multiply each token's score by the L2 norm of its value vector.
    add_mean_across_heads : bool, default=True
        Add the mean over a layer's kv heads to each head's scores (stabiliser).
    keep_token_lower_bound : int, default=0
        Minimum number of tokens of each layer in the layer allocation.
    scoring : {"auto", "lookahead", "reconstruct", "window"}, default="auto"
        Probe queries. "reconstruct": the context fed again after itself (the paper's probe;
        doubles the prefill): set it for KVCompose as published. "window": the last ``window`` prompt
        tokens (no extra pass). "lookahead" (not in the paper): the first ``lookahead`` tokens the model
        writes greedily after the context on the full cache, decoded and removed before the cache is
        rewritten; they query the context the way the answer will (Lookahead Q-Cache,
        https://arxiv.org/abs/2505.20334, uses pseudo queries the same way), at ``lookahead`` decode
        steps instead of a second prefill. "auto" (not in the paper): "lookahead" for a prompt
        compressed whole (``llm(prompt)``, chat completions, ``kv_probe``/``kv_apply``), whose end asks
        what the answer needs; "reconstruct" for ``compress_context`` (question-agnostic: a lookahead
        there continues the document, not an answer) and for the chunks of documents streamed past
        ``n_ctx`` (which are ranked by their question, ``question_tail``, when the cache is full). On
        1.5k-token needle prompts the lookahead kept the full cache's accuracy at 0.75 and 0.875 where
        the reconstruct probe lost half of it or more (README, "Quality so far").
    window : int, default=64
        Probe size of ``scoring="window"``.
    lookahead : int, default=32
        Probe size of ``scoring="lookahead"``: enough for a chat answer's lead-in ("The special magic
        number for X is") and the fact after it (8 drafts stopped before the digits); fewer are decoded
        when the model ends its answer or the cache is full.
    min_tokens : int, default=128
        Prompts shorter than this are not compressed.
    head_consensus : float, default=0.0
        Not in the paper. 0 keeps every head's own ranking (KVCompose as published); 1 makes every
        head of every layer keep the same tokens (ranked by the mean of the mean-normalised head
        scores); in between blends the two. On the embedded 135M model the consensus retrieves a
        planted pass key far more often (see the README); composite cells matter less there.
    per_head : bool, default=True (keyword only)
        False: the same tokens in every layer and head, evicted by llama.cpp (see ``BasePress``).
    starved_layers : {"own", "consensus"}, default="own"
        Not in the paper. llama.cpp gives every layer the same C cells, so a layer whose budget in the
        paper's allocation (``layer_budgets``) is at least C is starved. "own": every layer keeps each
        head's top-C (KVCompose as published). "consensus": starved layers rank by the cross-layer
        consensus (as ``head_consensus=1``); every other layer keeps each head's own top-b_l (its
        budget) and fills its remaining C - b_l cells by the consensus.
    span : int, default=1
        Not in the paper. Odd window of neighbouring cells (per layer and kv head, in position order):
        each token ranks by the highest score within ``span // 2`` cells either side, so a multi-token
        fact (a number split into digit tokens) is kept or dropped as a whole rather than digit by
        digit across heads. 1 ranks every token by its own score (as published).
    question_tail : int, default=48
        Not in the paper. A prompt longer than the cache (``kv_room="fill"``) with ``scoring`` "auto" or
        "lookahead": at every compression that makes room for the rest of the prompt, the prompt's last
        ``question_tail`` tokens (where its question usually is) and up to ``lookahead`` tokens the model
        writes greedily after them are decoded after the cache, and their attention ranks the cells
        (then removed; the chunks' persisted reconstruct scores stay with the cells). Chunk scores
        alone rank by text that follows a fact, which does not ask for it. 0: the persisted scores rank.
    question_consensus : float, default=1.0
        Not in the paper. The ``head_consensus`` of those question-ranked compressions: 1 makes every
        head of every layer keep the same cells, so a multi-token fact (a number split into digit tokens)
        is kept or dropped whole at every round; each head's own ranking, repeated over a document's
        rounds, kept some digits in some heads and others in others (3.5k-token pass-key documents through
        ``n_ctx=1024``: 15 of 20 keys found against 12 of 20 with 0; README, "Longer than the cache").
        A prompt compressed whole uses ``head_consensus``.
    protect_tail : int, default=0
        Not in the paper. The context's last ``protect_tail`` tokens are kept by every head, counted
        in C (kvpress appends the question uncompressed after compressing the context; a prompt
        compressed whole keeps its question's tail this way). 0 ranks the tail like any token.
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
    head_consensus: float = 0.0
    starved_layers: str = "own"
    span: int = 1
    protect_tail: int = 0
    question_tail: int = 48
    question_consensus: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("agg_task", self.agg_task, AGGREGATIONS)
        check_choice("agg_group", self.agg_group, AGGREGATIONS)
        check_choice("agg_head", self.agg_head, AGGREGATIONS)
        check_choice("scoring", self.scoring, SCORINGS)
        check_choice("starved_layers", self.starved_layers, STARVED_LAYER_RANKINGS)
        check_bool("add_v_norm", self.add_v_norm)
        check_bool("add_mean_across_heads", self.add_mean_across_heads)
        check_int("keep_token_lower_bound", self.keep_token_lower_bound, 0)
        check_int("window", self.window, 1)
        check_int("lookahead", self.lookahead, 1)
        check_int("min_tokens", self.min_tokens, 2)
        check_number("head_consensus", self.head_consensus, 0.0, 1.0, high_inclusive=True)
        check_number("question_consensus", self.question_consensus, 0.0, 1.0, high_inclusive=True)
        check_int("span", self.span, 1)
        check_int("protect_tail", self.protect_tail, 0)
        check_int("question_tail", self.question_tail, 0)
        if self.question_tail > QUESTION_TOKENS_KEPT:
            raise ValueError(f"question_tail must be at most {QUESTION_TOKENS_KEPT}, got {self.question_tail}")
        if self.span % 2 == 0:
            raise ValueError(f"span must be odd (a window centred on each token), got {self.span}")

    @property
    def room_window(self) -> int:
        """Newest tokens that score a full cache when no chunk capture saw them: ``window``."""
        return self.window

    def probe(self) -> ProbeSpec:
        """``("reconstruct", 0)``, ``("window", window)`` or ``("lookahead", lookahead)`` by ``scoring``
        ("auto": the lookahead; ``question_agnostic`` gives the press for contexts without a question)."""
        lookahead = ("lookahead", self.lookahead)
        return {"window": ("window", self.window), "lookahead": lookahead, "auto": lookahead}.get(
            self.scoring, ("reconstruct", 0))

    def scores_chunks(self) -> bool:
        """A lookahead scores prompts only: streamed chunks keep the reconstruct scores, as published
        (a chunk has no answer to look ahead to)."""
        return self.scoring != "window"

    def question_tail_tokens(self) -> int:
        """``question_tail`` for the lookahead scorings, else 0."""
        return self.question_tail if self.probe()[0] == "lookahead" else 0

    def question_ranked(self) -> "KVComposePress":
        """This press with ``head_consensus=question_consensus``."""
        return dataclasses.replace(self, head_consensus=self.question_consensus)

    def question_agnostic(self) -> "KVComposePress":
        """``scoring="auto"``: this press with the reconstruct probe (``compress_context``)."""
        return dataclasses.replace(self, scoring="reconstruct") if self.scoring == "auto" else self

    def head_scores(self, probe: Probe) -> np.ndarray:
        """Probe attention per query head, float32 (layers, heads, tokens), reduced over probe queries by ``agg_task``."""
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
        return _native.kvcompose_score(
            self.head_scores(probe), probe.n_head_kv, self.agg_group, value_norms, self.add_mean_across_heads,
        )

    def compress(self, probe: Probe, n_keep: int, forced: Sequence[int] = ()):
        """``BasePress.compress``, with the last ``protect_tail`` tokens (at most ``n_keep``) forced."""
        tail = min(self.protect_tail, n_keep)
        if tail:
            forced = sorted(set(forced) | set(range(probe.n_tokens - tail, probe.n_tokens)))
        return super().compress(probe, n_keep, forced)

    def selection_scores(self, scores: np.ndarray) -> np.ndarray:
        """
        The scores each (layer, kv head) ranks its tokens by: ``scores`` itself, raised to the best of
        each ``span`` window when ``span`` > 1, blended with the cross-layer consensus when
        ``head_consensus`` > 0.

        Parameters
        ----------
        scores : np.ndarray, float32 (layers, kv_heads, tokens)

        Returns
        -------
        np.ndarray, float32 (layers, kv_heads, tokens)
        """
        if self.span > 1:
            scores = span_max(scores, self.span)
        if self.head_consensus == 0:
            return scores
        return _native.scores_consensus(scores, self.head_consensus)

    def select(self, scores: np.ndarray, n_keep: int, forced=(), budgets=None) -> np.ndarray:
        """``BasePress.select``; with ``starved_layers="consensus"`` the budget-aware variant of the class docstring."""
        if self.starved_layers == "own" or not self.per_head:
            return super().select(scores, n_keep, forced)
        ranked = self.selection_scores(scores)
        consensus = _native.scores_consensus(scores, 1.0)
        if budgets is None:
            budgets = self.layer_budgets(scores)
        order = np.empty_like(consensus)
        for layer, budget in enumerate(budgets):
            order[layer] = consensus[layer]
            if budget < n_keep:
                # the layer's own top-b_l first (ranked above any consensus score), then the consensus
                own = _native.select_top(ranked[layer], int(budget), forced)
                np.put_along_axis(order[layer], own, np.inf, axis=-1)
        return _native.select_top(order, n_keep, forced)

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


def span_max(scores: np.ndarray, span: int) -> np.ndarray:
    """
    The highest score within ``span // 2`` tokens either side of each token (a sliding max).

    Parameters
    ----------
    scores : np.ndarray, float32 (layers, kv_heads, tokens)
    span : int, odd

    Returns
    -------
    np.ndarray, float32 (layers, kv_heads, tokens)
    """
    half = span // 2
    padded = np.pad(scores, [(0, 0)] * (scores.ndim - 1) + [(half, half)], constant_values=-np.inf)
    return np.ascontiguousarray(np.lib.stride_tricks.sliding_window_view(padded, span, axis=-1).max(axis=-1))
