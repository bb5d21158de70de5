"""What a press scores from: the probe attention and the cached keys and values of one context."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import numpy as np

#: A probe: ("window", w) = the context's last w tokens as queries, seen while it is prefilled;
#: ("lookahead", k) = up to k tokens the model greedily writes after the context, decoded and removed;
#: ("reconstruct", 0) = the whole context fed again after itself (KVCompose's probe).
ProbeSpec = Tuple[str, int]

#: The most of a prompt's last tokens a question probe may decode (``KVComposePress.question_tail``).
QUESTION_TOKENS_KEPT = 512


@dataclass
class Probe:
    """
    Everything a press may score one context from, measured once and shared by every press
    that scores the same context (the benchmark scores one prefill with many presses).

    Parameters
    ----------
    n_layer, n_head, n_head_kv, n_tokens : int
        Model shape and context length.
    attention : dict
        ``{spec: {"max": array, "mean": array}}``: probe attention per query head, float32
        (layers, heads, tokens), reduced over the probe's queries by max and by mean.
    norms : callable, optional
        ``norms(part)`` -> float32 (layers, kv_heads, tokens) L2 norms of the cached keys
        (``part="k"``) or values (``"v"``); read from the cache when first asked for.
    prefill_seconds, probe_seconds : float
        Time spent prefilling the context and in probes beyond the prefill.
    substitute : ProbeSpec, optional
        The probe that answers for any probe not run. Compressions of a cache that already holds
        composite cells (a prompt longer than the cache, long generations) can only observe the
        newest tokens' attention, so that window stands in for a press's own probe.
    in_place : bool
        The probe's attention mask showed the context in cache cells ``0..n_tokens-1``, token j in
        cell j: the norms and the rewrite can read the cache tensors instead of a copy of the state.
    question : ProbeSpec, optional
        The entry of ``attention`` that holds a prompt's question's attention to cells already in the
        cache (``probing.question_probe``); the compression carries it with the kept cells.
    """

    n_layer: int
    n_head: int
    n_head_kv: int
    n_tokens: int
    attention: Dict[ProbeSpec, Dict[str, np.ndarray]] = field(default_factory=dict)
    norms: Optional[Callable[[str], np.ndarray]] = None
    prefill_seconds: float = 0.0
    probe_seconds: float = 0.0
    description: str = ""
    substitute: Optional[ProbeSpec] = None
    in_place: bool = False
    question: Optional[ProbeSpec] = None
    _norm_cache: Dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def head_scores(self, spec: ProbeSpec, agg: str) -> np.ndarray:
        """Probe attention, float32 (layers, heads, tokens), of probe ``spec`` reduced by ``agg``."""
        if tuple(spec) not in self.attention and self.substitute is not None:
            spec = self.substitute
        try:
            return self.attention[tuple(spec)][agg]
        except KeyError:
            raise ValueError(f"probe {spec} with aggregation {agg!r} was not run for this context") from None

    def key_norms(self) -> np.ndarray:
        """float32 (layers, kv_heads, tokens): L2 norm of every cached key vector."""
        return self._norm("k")

    def value_norms(self) -> np.ndarray:
        """float32 (layers, kv_heads, tokens): L2 norm of every cached value vector."""
        return self._norm("v")

    def _norm(self, part: str) -> np.ndarray:
        if part not in self._norm_cache:
            if self.norms is None:
                raise ValueError("this probe has no access to the cache's keys and values")
            self._norm_cache[part] = self.norms(part)
        return self._norm_cache[part]
