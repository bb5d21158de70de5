"""Nothing lost when a compression fails; no shared state between instances."""

import threading

import llama_cpp
import numpy as np
import pytest

import pykvcompose.llama as llama_module
from helpers import last_logits, logits_after, seq_state
from pykvcompose import KVComposePress, Llama, _native

pytestmark = pytest.mark.model


def _boom(*args, **kwargs):
    raise RuntimeError("injected failure")


def _unsupported(*args, **kwargs):
    raise _native.UnsupportedCacheError(_native.KVC_ERR_UNSUPPORTED, "kvc_context_compose_tensors", "injected")


_REACHED = []


def _refused_after_removing(ctx, *args, **kwargs):
    """What kvc_context_compose_tensors does when llama.cpp refuses the composed state: the
    sequence is already gone (no full copy to put back)."""
    _REACHED.append(True)
    llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(ctx), 0, -1, -1)
    raise _native.LlamaRefusedError(_native.KVC_ERR_LLAMA, "kvc_context_compose_tensors", "injected failure")


@pytest.mark.parametrize("where", ["rewrite-tensors", "rewrite-state", "capture"])
def test_failed_compression_keeps_the_uncompressed_cache(llm, plain_llm, prompt_tokens, monkeypatch, where):
    ctx_tokens = prompt_tokens[:-1]
    plain_llm.reset()
    plain_llm.eval(ctx_tokens)
    expected_state = seq_state(plain_llm)
    plain_llm.eval(prompt_tokens[-1:])
    expected_logits = last_logits(plain_llm)

    llm.kv_compress = KVComposePress(compression_ratio=0.5, min_tokens=16)
    llm.reset()
    if where == "rewrite-tensors":
        monkeypatch.setattr(llama_module._native, "context_compose_tensors", _refused_after_removing)
    elif where == "rewrite-state":  # the fallback: the tensor path declines, the state path fails
        monkeypatch.setattr(llama_module._native, "context_compose_tensors", _unsupported)
        monkeypatch.setattr(llama_module._native, "context_compose", _boom)
    else:
        monkeypatch.setattr(type(llm._kv_capture), "scores", _boom)
    _REACHED.clear()
    with pytest.raises(RuntimeError, match="injected"):
        logits_after(llm, prompt_tokens)
    assert _REACHED == ([True] if where == "rewrite-tensors" else [])
    monkeypatch.undo()
    assert not llm._kv_capture.active
    assert llm.n_tokens == len(ctx_tokens)
    assert seq_state(llm) == expected_state  # exactly a plain prefill: probe cells gone, nothing rewritten
    # the conversation continues as if compression had been off: only the last token is decoded
    llm.kv_compress = None  # (with the press still set, the next call would try to compress again)
    np.testing.assert_array_equal(logits_after(llm, prompt_tokens), expected_logits)


def test_two_instances_compress_concurrently_like_one_at_a_time(model_path, prompt_tokens):
    press = KVComposePress(compression_ratio=0.5, min_tokens=16)
    prompts = [prompt_tokens, prompt_tokens[::-1]]
    llms = [Llama(model_path, n_ctx=1024, n_threads=1, verbose=False, kv_compress=press) for _ in prompts]
    sequential = []
    for m, p in zip(llms, prompts):
        sequential.append((logits_after(m, p), m.kv_selection.copy()))
        m.reset()
    results = [None, None]

    def run(i):
        results[i] = (logits_after(llms[i], prompts[i]), llms[i].kv_selection.copy())

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (a, sa), (b, sb) in zip(sequential, results):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(sa, sb)
    for m in llms:
        m.close()
