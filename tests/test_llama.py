"""Llama(kv_compress=...): exactness against llama.cpp, the composite-cell rewrite, API paths."""

import llama_cpp
import numpy as np
import pytest

from helpers import evict_with_llama_cpp, last_logits, logits_after, logits_after_compacting, seq_state
from pykvcompose import KVComposePress, Llama, _native

pytestmark = pytest.mark.model

F32, F16, BF16 = llama_cpp.GGML_TYPE_F32, llama_cpp.GGML_TYPE_F16, 30  # GGML_TYPE_BF16 (not exported by llama_cpp)
Q8_0, Q4_0 = llama_cpp.GGML_TYPE_Q8_0, llama_cpp.GGML_TYPE_Q4_0


@pytest.mark.parametrize("scoring", ["reconstruct", "window", "lookahead"])
def test_ratio_zero_gives_logits_identical_to_llama_cpp(llm, plain_llm, prompt_tokens, scoring):
    """Probe + rewrite at ratio 0 are lossless. The reference decodes the prompt in the same two
    calls (all but the last token, then the last), because llama.cpp's own logits depend on how a
    prompt is split into batches (max |delta logit| about 0.5 on this prompt between one call and two)."""
    plain_llm.reset()
    plain_llm.eval(prompt_tokens[:-1])
    plain_llm.eval(prompt_tokens[-1:])
    ref = last_logits(plain_llm)
    llm.kv_compress = KVComposePress(compression_ratio=0.0, scoring=scoring, min_tokens=16)
    llm.reset()
    ours = logits_after(llm, prompt_tokens)
    assert llm.kv_stats["cells_after"] == llm.kv_stats["cells_before"] == len(prompt_tokens) - 1
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize(
    "type_k,type_v,flash_attn",
    [
        (F16, F16, False),
        (F32, F32, False),
        (BF16, BF16, False),
        (Q8_0, F16, False),
        (Q4_0, F16, False),
        (F16, F16, True),
        (Q8_0, Q8_0, True),
        (Q4_0, Q4_0, True),
    ],
    ids=["f16", "f32", "bf16", "q8_0-k", "q4_0-k", "f16-plain-v", "q8_0-plain-v", "q4_0-plain-v"],
)
def test_same_tokens_in_every_head_equals_llama_eviction(model_path, prompt_tokens, type_k, type_v, flash_attn):
    """Composite cells holding the same token in every head are ordinary cells: the rewrite must be
    byte for byte what llama.cpp's own eviction (llama_memory_seq_rm) leaves, and give the logits
    llama.cpp gives on that eviction once it compacts it itself (state save + restore). The holey
    cache is not the logits reference: llama.cpp's attention rounds differently when the same cells
    sit at other indices (max |delta logit| 0.5-0.8 measured on this model), for its own compaction too."""
    kw = dict(n_ctx=1024, verbose=False, type_k=type_k, type_v=type_v, flash_attn=flash_attn)
    ctx_tokens, last = prompt_tokens[:-1], prompt_tokens[-1:]
    n = len(ctx_tokens)
    rng = np.random.default_rng(7)
    keep = np.sort(np.concatenate([rng.choice(n - 1, size=n // 3, replace=False), [n - 1]]))

    ref = llama_cpp.Llama(model_path, n_threads=2, **kw)
    ref.eval(ctx_tokens)
    ref_state = evict_with_llama_cpp(ref, n, keep)
    ref_logits = logits_after_compacting(ref, ref_state, last)
    ref.close()

    ours = Llama(model_path, **kw)
    ours.eval(ctx_tokens)
    L, Hkv = ours.kv_n_layer, ours.kv_n_head_kv
    selection = np.broadcast_to(keep.astype(np.int32), (L, Hkv, keep.size))
    result = _native.context_compose(ours._ctx.ctx, selection, expected_cells=n)
    assert result["cells_after"] == keep.size and result["pos_max"] == n - 1
    assert seq_state(ours) == ref_state
    ours.eval(last)
    np.testing.assert_array_equal(last_logits(ours), ref_logits)
    ours.close()


def test_per_head_selection_is_composite_reproducible_and_has_c_cells(llm, prompt_tokens):
    press = KVComposePress(compression_ratio=0.5, min_tokens=16)
    llm.kv_compress = press
    runs = []
    for _ in range(2):
        llm.reset()
        runs.append((logits_after(llm, prompt_tokens), llm.kv_selection.copy(), dict(llm.kv_stats)))
    (a, sel, stats), (b, sel2, _) = runs
    n = len(prompt_tokens) - 1
    c = press.n_kept(n)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(sel, sel2)
    assert sel.shape == (llm.kv_n_layer, llm.kv_n_head_kv, c)
    assert np.all(np.diff(sel, axis=-1) > 0) and np.all(sel[..., -1] == n - 1)
    # heads really keep different tokens: the rewrite is not token-level eviction
    assert any(not np.array_equal(sel[l, 0], sel[l, h]) for l in range(sel.shape[0]) for h in range(1, sel.shape[1]))
    assert stats["cells_before"] == n and stats["cells_after"] == c
    assert stats["kv_bytes_after"] * n == stats["kv_bytes_before"] * c
    # the cache holds C prompt cells + the held-back last token, positions ending at the logical end
    info = _native.context_state_info(llm._ctx.ctx)
    assert info["n_cells"] == c + 1 and info["pos_max"] == n and np.all(np.diff(info["positions"]) > 0)

    # and it is not the token-level result: same budget, every head keeping layer 0 head 0's tokens
    ours = Llama(llm.model_path, n_ctx=1024, verbose=False)
    ours.eval(prompt_tokens[:-1])
    same = np.broadcast_to(sel[0, 0], sel.shape)
    _native.context_compose(ours._ctx.ctx, same, expected_cells=n)
    ours.eval(prompt_tokens[-1:])
    assert not np.array_equal(last_logits(ours), a)
    ours.close()


def test_kv_stats_fields(llm, prompt_tokens):
    llm.kv_compress = KVComposePress(compression_ratio=0.75, min_tokens=16)
    llm.reset()
    logits_after(llm, prompt_tokens)
    st = llm.kv_stats
    for key in (
        "tokens",
        "cells_before",
        "cells_after",
        "kv_bytes_before",
        "kv_bytes_after",
        "prefill_seconds",
        "compress_seconds",
        "layer_budgets",
    ):
        assert key in st
    assert st["tokens"] == len(prompt_tokens)
    assert len(st["layer_budgets"]) == llm.kv_n_layer
    n = len(prompt_tokens) - 1
    assert abs(sum(st["layer_budgets"]) - int(llm.kv_n_layer * n * 0.25)) <= llm.kv_n_layer
    assert st["layer_budgets"][0] == max(st["layer_budgets"])
    assert st["prefill_seconds"] > 0 and st["compress_seconds"] > 0


def test_short_prompts_are_not_compressed(llm, prompt_tokens):
    llm.kv_compress = KVComposePress(compression_ratio=0.5, min_tokens=len(prompt_tokens) + 1)
    llm.kv_stats = {}
    llm.reset()
    logits_after(llm, prompt_tokens)
    assert llm.kv_stats == {}
    assert _native.context_state_info(llm._ctx.ctx)["n_cells"] == len(prompt_tokens)


def test_every_completion_path_compresses(llm, prompt_tokens):
    text = llm.detokenize(prompt_tokens).decode(errors="ignore")
    llm.kv_compress = KVComposePress(compression_ratio=0.5, min_tokens=64)
    calls = {
        "__call__": lambda: llm(text, max_tokens=4, temperature=0.0),
        "create_completion": lambda: llm.create_completion(text, max_tokens=4, temperature=0.0),
        "stream": lambda: list(llm.create_completion(text, max_tokens=4, temperature=0.0, stream=True)),
        "chat": lambda: llm.create_chat_completion(
            messages=[{"role": "user", "content": text}], max_tokens=4, temperature=0.0
        ),
        "chat-stream": lambda: list(
            llm.create_chat_completion(
                messages=[{"role": "user", "content": text}], max_tokens=4, temperature=0.0, stream=True
            )
        ),
    }
    for name, call in calls.items():
        llm.reset()
        llm.kv_stats = {}
        call()
        assert llm.kv_stats.get("cells_after", 0) > 0, name
        assert llm.kv_stats["cells_after"] < llm.kv_stats["cells_before"], name


def test_generation_continues_at_logical_positions(llm, prompt_tokens):
    llm.kv_compress = KVComposePress(compression_ratio=0.5, min_tokens=16)
    llm.reset()
    out = []
    for tok in llm.generate(prompt_tokens, temp=0.0):
        out.append(tok)
        if len(out) == 5:
            break
    assert llm.n_tokens == len(prompt_tokens) + 4  # the 5th token is sampled, not yet decoded
    info = _native.context_state_info(llm._ctx.ctx)
    assert info["pos_max"] == llm.n_tokens - 1
    assert info["n_cells"] == llm.kv_stats["cells_after"] + 1 + 4


def test_follow_up_prompt_reuses_compressed_cache_and_divergence_reprefills(llm, model_path, prompt_tokens):
    press = KVComposePress(compression_ratio=0.5, min_tokens=16)
    llm.kv_compress = press
    llm.reset()
    logits_after(llm, prompt_tokens)
    stats = dict(llm.kv_stats)
    # a prompt extending the history continues on the compressed cache: no new compression
    longer = list(prompt_tokens) + llm.tokenize(b" And then", add_bos=False)
    llm.kv_stats = {}
    extended = logits_after(llm, longer)
    assert llm.kv_stats == {}
    assert _native.context_state_info(llm._ctx.ctx)["n_cells"] == stats["cells_after"] + 1 + (
        len(longer) - len(prompt_tokens)
    )

    # a prompt that diverges inside the compressed part is prefilled again from its own tokens
    other = list(prompt_tokens[:100]) + list(reversed(prompt_tokens[100:]))
    diverged = logits_after(llm, other)
    fresh = Llama(model_path, n_ctx=2048, verbose=False, kv_compress=press)
    np.testing.assert_array_equal(diverged, logits_after(fresh, other))
    # the multi-turn path is reproducible: compress the first prompt, then extend it, on a new instance
    logits_after(fresh, prompt_tokens)
    np.testing.assert_array_equal(extended, logits_after(fresh, longer))
    fresh.close()


def test_default_model_and_threads():
    m = Llama(n_ctx=256, verbose=False)
    import os

    assert m.model_path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert m.n_threads == len(os.sched_getaffinity(0))
    assert m.kv_compress is None
    m.close()


def test_save_and_load_state_keep_the_compressed_cache(llm, prompt_tokens):
    llm.kv_compress = KVComposePress(compression_ratio=0.5, min_tokens=16)
    llm.reset()
    logits_after(llm, prompt_tokens)
    state = llm.save_state()
    longer = list(prompt_tokens) + llm.tokenize(b" Next", add_bos=False)
    expected = logits_after(llm, longer)
    llm.reset()
    llm.load_state(state)
    assert llm._kv.compressed_len == len(prompt_tokens) - 1
    np.testing.assert_array_equal(logits_after(llm, longer), expected)
