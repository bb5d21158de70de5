"""Needle haystacks for the benchmarks and tests: pass-key cases, chat prompts, where a needle sits and
how much of it each head kept. The haystack text and the pass-key document are the demo's own
(``pykvcompose.demo``)."""

from __future__ import annotations

from typing import Callable, List, Sequence, Tuple

import numpy as np

from pykvcompose.demo import PASSKEY_QUESTION, haystack_text, paragraphs, passkey_prompt, take_paragraphs

__all__ = [
    "PASSKEY_QUESTION",
    "haystack_text",
    "paragraphs",
    "passkey_prompt",
    "take_paragraphs",
    "passkey_chat_prompt",
    "passkey_cases",
    "passkey_positions",
    "share_kept",
]


def passkey_chat_prompt(llm, prompt: str) -> str:
    """A ``passkey_prompt`` as the user's turn of ``llm``'s chat template (the completion lead-in replaced by
    "Answer with the number only."), the assistant's turn opened. (Runs before this used SmolLM2's turns
    written out, without the template's default system prompt.)"""
    from .runner import user_turn

    body = prompt.rsplit("\n\n", 1)[0]
    return user_turn(llm, f"{body}\n\nWhat is the pass key? Answer with the number only.")


def passkey_cases(
    tokenize: Callable[[str], List[int]], n_tokens: int, depths: Sequence[float], first: int = 0
) -> List[Tuple[float, int, str]]:
    """One ``(depth, passkey, prompt)`` per depth: the fixed cases of the tests and ``bench/passkey.py``.
    ``first`` numbers the cases from there, so that a new set has keys and haystack text of its own."""
    cases = []
    for i, depth in enumerate(depths, start=first):
        key = 10000 + (7919 * (i + 3)) % 89999
        cases.append((depth, key, passkey_prompt(tokenize, n_tokens, depth, key, seed=i)))
    return cases


def passkey_positions(tokenize: Callable[[str], List[int]], tokens: Sequence[int], key: int) -> np.ndarray:
    """Positions in ``tokens`` of "The pass key is {key}" (``tokenize`` without BOS, as the sentence follows a
    paragraph break in a ``passkey_cases`` prompt)."""
    needle = tokenize(f"The pass key is {key}")
    at = next(i for i in range(len(tokens)) if list(tokens[i : i + len(needle)]) == needle)
    return np.arange(at, at + len(needle))


def share_kept(selection: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Share of ``positions`` each (layer, kv head) of ``selection`` (layers, kv_heads, cells) keeps:
    (layers, kv_heads)."""
    return np.isin(selection, positions).sum(-1) / len(positions)
