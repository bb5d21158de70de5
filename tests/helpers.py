"""What the tests share besides fixtures: the parametrized list of presses, greedy decoding, logits and sequence
states read straight from llama.cpp, and llama.cpp's own eviction (the reference for token-level selections).
Imported as ``helpers`` (pytest's ``pythonpath`` holds tests/)."""

import os

import llama_cpp
import numpy as np

from pykvcompose import (
    KnormPress,
    KVComposePress,
    PyramidKVPress,
    RandomPress,
    SnapKVPress,
    StreamingLLMPress,
    TOVAPress,
)

N_THREADS = max(1, len(os.sched_getaffinity(0)))


def press_list(ratio, per_head=True):
    """The shared list of presses every test that loops over presses uses: every scoring press, with
    fields that work on the test prompts (a few hundred tokens)."""
    kw = dict(compression_ratio=ratio, per_head=per_head)
    return [
        KVComposePress(min_tokens=16, **kw),  # the default: a lookahead probe
        KVComposePress(min_tokens=16, scoring="reconstruct", **kw),  # as published
        SnapKVPress(window_size=32, **kw),
        PyramidKVPress(window_size=32, **kw),
        TOVAPress(**kw),
        KnormPress(**kw),
        StreamingLLMPress(n_sink=4, **kw),
        RandomPress(seed=3, **kw),
    ]


def press_ids(presses):
    return [
        type(p).__name__
        + ("-published" if getattr(p, "scoring", None) == "reconstruct" else "")
        + ("" if getattr(p, "per_head", True) else "-token")
        for p in presses
    ]


def last_logits(llm) -> np.ndarray:
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(llm.n_vocab(),)).copy()


def logits_after(llm, tokens) -> np.ndarray:
    """Next-token logits after the prompt, through ``generate`` (the path every API takes)."""
    gen = llm.generate(tokens, temp=0.0)
    next(gen)
    gen.close()
    return last_logits(llm)


def greedy(llm, tokens, n):
    """n greedy tokens, EOS included (the test wants a fixed length, not a sensible answer)."""
    out = []
    for tok in llm.generate(tokens, temp=0.0, top_k=1):
        out.append(tok)
        if len(out) == n:
            break
    return out


def seq_state(llm, seq_id: int = 0) -> bytes:
    ctx = llm._ctx.ctx
    size = llama_cpp.llama_state_seq_get_size(ctx, seq_id)
    buf = (llama_cpp.ctypes.c_uint8 * size)()
    assert llama_cpp.llama_state_seq_get_data(ctx, buf, size, seq_id) == size
    return bytes(buf)


def evict_with_llama_cpp(llm, n: int, keep) -> bytes:
    """Remove every position of 0..n-1 not in ``keep`` with llama.cpp's own ``llama_memory_seq_rm``;
    the sequence state afterwards (the reference for token-level selections)."""
    mem = llama_cpp.llama_get_memory(llm._ctx.ctx)
    for p in sorted(set(range(n)) - set(int(k) for k in keep)):
        assert llama_cpp.llama_memory_seq_rm(mem, 0, p, p + 1)
    return seq_state(llm)


def logits_after_compacting(llm, state: bytes, last) -> np.ndarray:
    """Next logits after ``state`` is loaded into the emptied cache (llama.cpp compacts its cells) and
    ``last`` decoded: llama.cpp's own logits on an eviction, without the holes it leaves in place."""
    llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(llm._ctx.ctx), 0, -1, -1)
    buf = (llama_cpp.ctypes.c_uint8 * len(state)).from_buffer_copy(state)
    assert llama_cpp.llama_state_seq_set_data(llm._ctx.ctx, buf, len(state), 0) == len(state)
    llm.eval(last)
    return last_logits(llm)
