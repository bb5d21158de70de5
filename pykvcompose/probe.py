"""What a press scores from: the probe attention and the cached keys and values of one context, and the
typed names of the probes that measure it."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Callable, Dict, NamedTuple, Optional, Tuple, Union

import numpy as np


class ProbeKind(str, enum.Enum):
    """What queried the cells. The first three are the probes a press asks for (``BasePress.probe``); the
    others are what a compression that makes room measures instead (``pykvcompose.streaming``)."""

    #: the context's last ``size`` tokens, seen while it is prefilled
    WINDOW = "window"
    #: up to ``size`` tokens the model greedily writes after the context, decoded and removed
    LOOKAHEAD = "lookahead"
    #: the whole context fed again after itself (KVCompose's probe)
    RECONSTRUCT = "reconstruct"
    #: a full cache's newest ``size`` tokens, decoded once more
    RECENT = "recent"
    #: the ``size`` tokens streamed in since the last compression, captured while they were prefilled
    CHUNK = "chunk"
    #: every cell's own chunk probe (a reconstruct probe), persisted through rewrites
    PERSISTED = "persisted"
    #: a streamed prompt's last ``size`` tokens and a lookahead after them, decoded after the cache
    QUESTION = "question"

    __hash__ = str.__hash__  # ("window", 64) and ProbeSpec(ProbeKind.WINDOW, 64) are one dict key

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class ProbeSpec(NamedTuple):
    """A probe: its kind and size (queries; 0 where the context sets it). Equal to ``(kind value, size)``."""

    kind: ProbeKind
    size: int = 0

    @classmethod
    def of(cls, spec: Union[ProbeSpec, Tuple[str, int]]) -> ProbeSpec:
        """``spec`` as a ProbeSpec; ValueError naming the kinds for an unknown one."""
        kind, size = spec
        try:
            return cls(ProbeKind(kind), int(size))
        except ValueError:
            raise ValueError(
                f"unknown probe {tuple(spec)!r}: expected one of {', '.join(k.value for k in ProbeKind)} with a size"
            ) from None


#: The most of a prompt's last tokens a question probe may decode (``StreamPolicy.question_tail``).
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
        ``{ProbeSpec: {"max": array, "mean": array}}``: probe attention per query head, float32
        (layers, heads, tokens), reduced over the probe's queries by max and by mean.
    norms : callable, optional
        ``norms(part)`` -> float32 (layers, kv_heads, tokens) L2 norms of the cached keys
        (``part="k"``) or values (``"v"``); read from the cache when first asked for.
    prefill_seconds, probe_seconds : float
        Time spent prefilling the context and in probes beyond the prefill.
    in_place : bool
        The probe's attention mask showed the context in cache cells ``0..n_tokens-1``, token j in
        cell j: the norms and the rewrite can read the cache tensors instead of a copy of the state.
    stand_ins : dict
        ``{asked: measured}``: probes a press asks for that the caller answered with another one it
        measured (``stand_in``); a compression's ``kv_stats["probe"]`` names them.
    self_information : np.ndarray, optional
        float32 (tokens,): ``-log p(token | the tokens before it)`` in nats, from the prefill's logits
        (measured when a press reads it, ``BasePress.reads_self_information``; 0 for the first token).
    sentences : np.ndarray, optional
        int32 (tokens,): the sentence of each token, counted from 0; a new one starts after a token
        whose text holds ``. ! ?`` or a line break (Selective Context's lexical units).
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
    in_place: bool = False
    stand_ins: Dict[ProbeSpec, ProbeSpec] = field(default_factory=dict)
    self_information: Optional[np.ndarray] = None
    sentences: Optional[np.ndarray] = None
    _norm_cache: Dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def sentence_information(self) -> np.ndarray:
        """float32 (tokens,): the most self-information of any token in each token's sentence."""
        if self.self_information is None or self.sentences is None:
            raise ValueError("the self-information of this context was not measured")
        peak = np.zeros(int(self.sentences.max()) + 1, dtype=np.float32)
        np.maximum.at(peak, self.sentences, self.self_information)
        return peak[self.sentences]

    def head_scores(self, spec: Union[ProbeSpec, Tuple[str, int]], agg: str) -> np.ndarray:
        """Probe attention, float32 (layers, heads, tokens), of probe ``spec`` reduced by ``agg``."""
        try:
            return self.attention[ProbeSpec.of(spec)][agg]
        except KeyError:
            raise ValueError(f"probe {tuple(spec)} with aggregation {agg!r} was not run for this context") from None

    def measured(self, kind: ProbeKind) -> Optional[Tuple[ProbeSpec, Dict[str, np.ndarray]]]:
        """The probe of ``kind`` this context measured (not one standing in) and its attention, or None."""
        return next(
            ((spec, att) for spec, att in self.attention.items() if spec.kind is kind and spec not in self.stand_ins),
            None,
        )

    def stand_in(self, asked: Optional[ProbeSpec], measured: ProbeSpec) -> None:
        """Answer a press that asks for probe ``asked`` with the attention of ``measured`` (the caller
        decides: a full cache cannot run a prompt's probe again). Nothing to do for presses without a probe."""
        if asked is None or asked == measured:
            return
        asked = ProbeSpec.of(asked)
        self.attention[asked] = self.attention[measured]
        self.stand_ins[asked] = measured

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
