"""Offline haystack text and planted facts for demos and tests."""

from __future__ import annotations

import functools
import random
from typing import Callable, List, Sequence, Tuple

import numpy as np

PASSKEY_QUESTION = "What is the pass key? The pass key is"


def haystack_text() -> str:
    """About 465k characters of Python documentation shipped with CPython (``pydoc_data.topics``)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k].strip() for k in sorted(topics))


@functools.lru_cache(maxsize=1)
def paragraphs() -> Tuple[str, ...]:
    """The haystack's non-empty paragraphs, in order."""
    return tuple(p for p in haystack_text().split("\n\n") if p.strip())


def take_paragraphs(tokenize: Callable[[str], List[int]], n_tokens: int, start: int) -> List[str]:
    """Consecutive paragraphs from index ``start`` (wrapping around) totalling at most ``n_tokens`` tokens,
    counting one token for each paragraph break."""
    every = paragraphs()
    chosen: List[str] = []
    used = 0
    for p in every[start:] + every[:start]:
        cost = len(tokenize(p)) + 1
        if used + cost > n_tokens:
            break
        chosen.append(p)
        used += cost
    return chosen


def passkey_prompt(tokenize: Callable[[str], List[int]], n_tokens: int, depth: float, passkey: int,
                   seed: int = 0) -> str:
    """A ``n_tokens``-ish haystack with a pass key planted at relative ``depth`` (0 = start, 1 = end).

    ``tokenize`` maps text to tokens (e.g. ``lambda s: llm.tokenize(s.encode())``); the haystack
    is cut at a paragraph boundary chosen by ``seed`` so that different seeds read different text.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    start = random.Random(seed).randrange(len(paragraphs()) // 2)
    needle = f"The pass key is {passkey}. Remember it. {passkey} is the pass key."
    intro = "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it.\n\n"
    budget = n_tokens - len(tokenize(intro + needle + "\n\n" + PASSKEY_QUESTION)) - 8
    chosen = take_paragraphs(tokenize, budget, start)
    at = round(depth * len(chosen))
    body = chosen[:at] + [needle] + chosen[at:]
    return intro + "\n\n".join(body) + "\n\n" + PASSKEY_QUESTION


def passkey_chat_prompt(prompt: str) -> str:
    """A ``passkey_prompt`` inside SmolLM2's chat template: the document and question as the user's turn
    (the completion lead-in replaced by "Answer with the number only."), the assistant's turn opened."""
    body = prompt.rsplit("\n\n", 1)[0]
    return (f"<|im_start|>user\n{body}\n\nWhat is the pass key? Answer with the number only.<|im_end|>\n"
            "<|im_start|>assistant\n")


def passkey_cases(tokenize: Callable[[str], List[int]], n_tokens: int,
                  depths: Sequence[float]) -> List[Tuple[float, int, str]]:
    """One ``(depth, passkey, prompt)`` per depth: the fixed cases of the tests and ``bench/passkey.py``."""
    cases = []
    for i, depth in enumerate(depths):
        key = 10000 + (7919 * (i + 3)) % 89999
        cases.append((depth, key, passkey_prompt(tokenize, n_tokens, depth, key, seed=i)))
    return cases


def passkey_positions(tokenize: Callable[[str], List[int]], tokens: Sequence[int], key: int) -> np.ndarray:
    """Positions in ``tokens`` of "The pass key is {key}" (``tokenize`` without BOS, as the sentence follows a
    paragraph break in a ``passkey_cases`` prompt)."""
    needle = tokenize(f"The pass key is {key}")
    at = next(i for i in range(len(tokens)) if list(tokens[i:i + len(needle)]) == needle)
    return np.arange(at, at + len(needle))


def share_kept(selection: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Share of ``positions`` each (layer, kv head) of ``selection`` (layers, kv_heads, cells) keeps: (layers, kv_heads)."""
    return np.isin(selection, positions).sum(-1) / len(positions)
