"""Beyond n_ctx: prompts longer than the cache, long generations (DecodingPress), multi-turn reuse, with
kv_room="ratio" (a full cache compressed to the press's ratio; the default "fill" is tested in test_fill.py)."""

import llama_cpp
import numpy as np
import pytest

from helpers import N_THREADS, greedy, last_logits, press_ids, press_list, seq_state
from kvbench.haystack import haystack_text
from pykvcompose import Llama
from pykvcompose.presses import (
    DecodingPress,
    KnormPress,
    KVComposePress,
    PrefillDecodingPress,
    SnapKVPress,
    StreamingLLMPress,
)

pytestmark = pytest.mark.model

N_CTX = 256


@pytest.fixture(scope="module")
def long_tokens(plain_llm):
    """About 700 tokens: nearly three caches of N_CTX cells."""
    toks = plain_llm.tokenize(haystack_text()[40000:43500].encode())
    assert len(toks) > 2.5 * N_CTX
    return toks[:700]


@pytest.fixture(scope="module")
def small(model_path):
    m = Llama(model_path, n_ctx=N_CTX, n_batch=128, verbose=False, kv_room="ratio")
    yield m
    m.close()


def test_a_prompt_longer_than_the_cache_is_compressed_chunk_by_chunk(small, long_tokens):
    small.kv_compress = SnapKVPress(compression_ratio=0.5)
    small.reset()
    out = small.create_completion(long_tokens, max_tokens=4, temperature=0.0)
    assert out["usage"]["prompt_tokens"] == len(long_tokens)
    assert small.kv_compressions >= 3  # 700 tokens through 256 cells halved each time
    assert small.kv_cells <= N_CTX
    assert small.n_tokens > 2 * N_CTX  # positions continue past n_ctx
    assert small.kv_history[: len(long_tokens)] == long_tokens  # the logical history is kept whole
    assert small.kv_stats["trigger"] == "cache full"
    assert small.kv_stats["cells_before"] == N_CTX and small.kv_stats["cells_after"] == N_CTX // 2


# the presses that read attention (the others have no probe attention to check)
ATTENTION_PRESSES = [p for p in press_list(0.5) + press_list(0.5, per_head=False) if p.probe() is not None]


@pytest.mark.parametrize("press", ATTENTION_PRESSES, ids=press_ids(ATTENTION_PRESSES))
def test_the_newest_tokens_attention_covers_exactly_the_cells(small, long_tokens, press):
    """Capture columns are cache cells, the state buffer lists cells in order: they must be the same
    cells. The newest tokens see every cell, so their mean attention over the first ``cells``
    columns sums to 1 in every layer and head, after one compression and after several."""
    small.kv_compress = press
    small.reset()
    for n in (N_CTX + 1, len(long_tokens)):
        small.reset()
        small.eval(long_tokens[:n])
        heads = small.kv_head_scores
        assert heads.shape[-1] == small.kv_stats["cells_before"]
        if press.probe()[0] == "window":
            np.testing.assert_allclose(heads.sum(axis=-1), 1.0, atol=2e-3)
        else:
            # KVCompose's max over queries: every cell of the kept range was seen by some query
            assert (heads.max(axis=1) > 0).mean() > 0.99


def test_one_compression_equals_llama_cpp_eviction(model_path, small, long_tokens):
    """StreamingLLM token-level on a full cache keeps the sinks and the newest half: the same cells
    llama.cpp's own llama_memory_seq_rm leaves (compacted by its state save/restore), byte for byte,
    and the next token's logits are identical."""
    small.kv_compress = StreamingLLMPress(compression_ratio=0.5, n_sink=4, per_head=False)
    small.reset()
    small.eval(long_tokens[: N_CTX + 1])
    assert small.kv_compressions == 1
    ours_logits, ours_state = last_logits(small), seq_state(small)

    ref = llama_cpp.Llama(model_path, n_ctx=N_CTX, n_batch=128, n_threads=N_THREADS, verbose=False)
    try:
        ref.eval(long_tokens[:N_CTX])
        mem = llama_cpp.llama_get_memory(ref._ctx.ctx)
        keep = N_CTX // 2
        assert llama_cpp.llama_memory_seq_rm(mem, 0, 4, N_CTX - (keep - 4))
        state = seq_state(ref)
        llama_cpp.llama_memory_seq_rm(mem, 0, -1, -1)
        buf = (llama_cpp.ctypes.c_uint8 * len(state)).from_buffer_copy(state)
        assert llama_cpp.llama_state_seq_set_data(ref._ctx.ctx, buf, len(state), 0) == len(state)
        ref._batch.set_batch(batch=long_tokens[N_CTX : N_CTX + 1], n_past=N_CTX, logits_all=False)
        ref._ctx.decode(ref._batch)
        assert seq_state(ref) == ours_state
        np.testing.assert_array_equal(last_logits(ref), ours_logits)
    finally:
        ref.close()


def test_a_prompt_that_cannot_be_made_to_fit_raises_llama_cpp_pythons_error(small, long_tokens):
    for press in (None, SnapKVPress(0.0)):
        small.kv_compress = press
        small.reset()
        with pytest.raises(ValueError, match=r"Requested tokens \(700\) exceed context window of 256"):
            small.create_completion(long_tokens, max_tokens=2)
    small.kv_compress = SnapKVPress(0.5)
    assert small._n_ctx == 8192  # SmolLM2's trained context
    with pytest.raises(ValueError, match="exceed context window"):
        small.create_completion(long_tokens * 12, max_tokens=2)  # 8400 > kv_max_tokens


def test_decoding_press_keeps_generation_going_past_n_ctx(small, long_tokens):
    press = DecodingPress(SnapKVPress(), compression_interval=32, target_size=96, hidden_states_buffer_size=16)
    small.kv_compress = press
    small.reset()
    prompt = long_tokens[:100]  # fits: not compressed, DecodingPress only acts while generating
    cells = []
    out = []
    for tok in small.generate(prompt, temp=0.0, top_k=1):
        out.append(tok)
        cells.append(small.kv_cells)
        if len(out) == 300:
            break
    assert small.n_tokens == 100 + 299  # the last sampled token is not decoded yet
    assert max(cells) == 100 + 32  # the first interval starts from the prompt's cells
    assert max(cells[40:]) == 96 + 32 < N_CTX  # then from target_size
    assert small.kv_compressions >= 8
    assert small.kv_stats["trigger"] == "interval" and small.kv_stats["cells_after"] == 96
    assert small.kv_history == prompt + out[:-1]


def test_prefill_decoding_press_uses_each_press_in_its_phase(small, long_tokens):
    press = PrefillDecodingPress(KnormPress(0.5), DecodingPress(KnormPress(), compression_interval=40, target_size=64))
    small.kv_compress = press
    small.reset()
    out = greedy(small, long_tokens[:200], 100)
    assert len(out) == 100
    assert small.kv_stats["press"] == "DecodingPress" and small.kv_stats["cells_after"] == 64
    small.reset()
    greedy(small, long_tokens[:200], 1)
    assert small.kv_stats["press"] == "KnormPress" and small.kv_stats["cells_after"] == 99  # prompt minus 1, halved


def test_generation_past_n_ctx_with_a_prompt_press(small, long_tokens):
    """No DecodingPress: a full cache during generation is compressed by the prompt's press."""
    small.kv_compress = SnapKVPress(0.5)
    small.reset()
    out = greedy(small, long_tokens[:200], 250)
    assert len(out) == 250 and small.n_tokens == 449 > N_CTX
    assert small.kv_stats["trigger"] == "cache full"


def test_next_turn_reuses_the_compressed_cache(small, long_tokens):
    small.kv_compress = SnapKVPress(0.5)
    small.reset()
    prompt = long_tokens[:200]
    first = greedy(small, prompt, 5)
    compressed = small._kv.compressed_len
    assert compressed == 199
    decoded = []
    original = small._engine.decode
    small._engine.decode = lambda batch: (decoded.append(len(batch)), original(batch))
    try:
        follow = prompt + first + long_tokens[300:340]
        greedy(small, follow, 3)
    finally:
        del small._engine.decode
    assert small._kv.compressed_len == compressed  # no new prompt compression: it continued on the cache
    assert sum(decoded) <= len(follow) - compressed + 3  # only the new suffix (+ the sampled tokens)


def test_a_prompt_diverging_inside_the_compressed_part_is_prefilled_from_the_original(model_path, small, long_tokens):
    press = SnapKVPress(0.5)
    small.kv_compress = press
    small.reset()
    greedy(small, long_tokens[:200], 3)
    diverging = long_tokens[:50] + long_tokens[400:560]
    ours = greedy(small, diverging, 6)
    fresh = Llama(model_path, n_ctx=N_CTX, n_batch=128, verbose=False, kv_room="ratio", kv_compress=press)
    try:
        assert greedy(fresh, diverging, 6) == ours
        assert fresh.kv_history == small.kv_history
    finally:
        fresh.close()


def test_compress_context_of_a_document_longer_than_the_cache(small, long_tokens):
    small.kv_compress = None
    small.reset()
    stats = small.compress_context(long_tokens, SnapKVPress(0.75))
    assert stats["trigger"] == "context"
    assert small.kv_cells == stats["cells_after"] == int(stats["cells_before"] * 0.25)
    assert small.n_tokens == len(long_tokens)
    with pytest.raises(ValueError, match="cannot free cells"):
        small.compress_context(long_tokens, SnapKVPress(0.0))


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: DecodingPress(None), "base_press"),
        (lambda: DecodingPress(SnapKVPress(), compression_interval=0), "compression_interval"),
        (lambda: DecodingPress(SnapKVPress(), target_size=-1), "target_size"),
        (lambda: PrefillDecodingPress(), "needs a prefilling_press"),
        (lambda: PrefillDecodingPress(SnapKVPress(), SnapKVPress()), "decoding_press must be a DecodingPress"),
    ],
)
def test_generation_press_validation(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_target_size_must_fit_the_cache(small):
    with pytest.raises(ValueError, match=r"target_size \(2048\) must be below n_ctx - 1 \(255\)"):
        small.kv_compress = DecodingPress(SnapKVPress())


@pytest.mark.parametrize("bad", [0, -5, 1.5, True, "8k"])
def test_kv_max_tokens_validation(model_path, bad):
    with pytest.raises(ValueError, match="kv_max_tokens"):
        Llama(model_path, n_ctx=N_CTX, kv_max_tokens=bad, verbose=False)


def test_progress_is_reported_per_batch(model_path, long_tokens):
    seen = []
    llm = Llama(
        model_path,
        n_ctx=N_CTX,
        n_batch=128,
        verbose=False,
        kv_room="ratio",
        kv_compress=KVComposePress(0.5, min_tokens=16, scoring="reconstruct"),
        kv_progress=lambda done, total, stage: seen.append((stage, done, total)),
    )
    try:
        greedy(llm, long_tokens[:200], 1)  # fits: prefill of 199 tokens, reconstruct probe, last token
        assert [s for s in seen if s[0] == "prefill"][:2] == [("prefill", 128, 199), ("prefill", 199, 199)]
        probe = [s for s in seen if s[0] == "probe"]
        assert probe and probe[-1] == ("probe", 199, 199)
        assert all(a[1] < b[1] for a, b in zip(probe, probe[1:]))
        seen.clear()
        llm.reset()
        greedy(llm, long_tokens, 1)  # longer than the cache: one prefill of all 700, compressed on the way
        assert seen[-1] == ("prefill", 700, 700) and {s[0] for s in seen} == {"prefill"}
    finally:
        llm.close()


def test_kv_selection_follows_cells_through_several_compressions(small, long_tokens):
    """After compressions that made room, kv_selection still names original positions: StreamingLLM keeps the
    sinks and the newest cells, so after two rounds it holds positions 0-3 and the newest 124."""
    small.kv_compress = StreamingLLMPress(compression_ratio=0.5, n_sink=4, per_head=False)
    small.reset()
    small.eval(long_tokens[: N_CTX + N_CTX // 2 + 1])
    assert small.kv_compressions == 2
    expected = list(range(4)) + list(range(N_CTX + N_CTX // 2 - 124, N_CTX + N_CTX // 2))
    assert (small.kv_selection == np.array(expected)).all()
    small.kv_compress = KVComposePress(0.5)
    small.reset()
    small.eval(long_tokens)
    sel = small.kv_selection
    assert sel.shape == (small.kv_n_layer, small.kv_n_head_kv, small.kv_stats["cells_after"])
    assert (np.diff(sel, axis=-1) > 0).all() and sel.min() >= 0 and sel.max() == small.kv_stats["tokens"] - 1


def test_a_failed_compression_to_make_room_loses_nothing(model_path, small, long_tokens, monkeypatch):
    """The rewrite fails in the middle of a long prompt: the error propagates, the cache still holds the
    conversation up to there, and the next request gives what a fresh instance gives."""
    from pykvcompose import _native

    small.kv_compress = SnapKVPress(0.5)
    small.reset()
    real = _native.context_compose
    calls = []

    def failing(ctx, selection, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise _native.NativeError(_native.KVC_ERR_LLAMA, "kvc_context_compose", "injected")
        return real(ctx, selection, *args, **kwargs)

    monkeypatch.setattr(_native, "context_compose", failing)
    with pytest.raises(_native.NativeError, match="injected"):
        small.create_completion(long_tokens, max_tokens=2, temperature=0.0)
    assert small.kv_cells == N_CTX  # full, not compressed, nothing dropped
    assert small.kv_history == long_tokens[: small.n_tokens] and small.n_tokens > N_CTX
    monkeypatch.setattr(_native, "context_compose", real)
    ours = greedy(small, long_tokens, 4)
    fresh = Llama(model_path, n_ctx=N_CTX, n_batch=128, verbose=False, kv_room="ratio", kv_compress=SnapKVPress(0.5))
    try:
        assert greedy(fresh, long_tokens, 4) == ours
    finally:
        fresh.close()


def test_a_failed_probe_of_the_newest_tokens_puts_them_back(model_path, small, long_tokens, monkeypatch):
    """SnapKV scores by re-decoding the newest tokens with the capture on; if reading the capture fails,
    those tokens are decoded again without it and the conversation goes on unchanged."""
    from pykvcompose import _capture, _native

    small.kv_compress = SnapKVPress(0.5)
    small.reset()
    real = _capture.Capture.scores
    monkeypatch.setattr(
        _capture.Capture,
        "scores",
        lambda self, agg="max", head=False: (_ for _ in ()).throw(
            _native.NativeError(_native.KVC_ERR_CAPTURE, "kvc_capture_get_scores", "injected")
        ),
    )
    with pytest.raises(_native.NativeError, match="injected"):
        small.eval(long_tokens[: N_CTX + 1])
    assert small.n_tokens == N_CTX and small.kv_cells == N_CTX
    assert small.kv_history == long_tokens[:N_CTX]
    monkeypatch.setattr(_capture.Capture, "scores", real)
    ours = greedy(small, long_tokens[:400], 4)
    fresh = Llama(model_path, n_ctx=N_CTX, n_batch=128, verbose=False, kv_room="ratio", kv_compress=SnapKVPress(0.5))
    try:
        assert greedy(fresh, long_tokens[:400], 4) == ours
    finally:
        fresh.close()
