"""The architecture matrix: tiny random-weight GGUF models of the architectures users bring
(tests/tiny_models.py), each with flash attention off and on, through the machinery every
compression relies on; the architectures without per-token K/V rows are refused by name.

Random weights say nothing about quality: these tests check graph node names, cache layouts,
head sizes, biases, norms and softcapping, against llama.cpp itself where it can be the reference."""

import llama_cpp
import numpy as np
import pytest

from helpers import (
    N_THREADS,
    evict_with_llama_cpp,
    greedy,
    last_logits,
    logits_after,
    logits_after_compacting,
    seq_state,
)
from kvbench.haystack import haystack_text
from pykvcompose import KVComposePress, Llama, _native
from tiny_models import MODELS, model_file

pytestmark = pytest.mark.model

SUPPORTED = [m for m in MODELS if m.supported]
REFUSED = [m for m in MODELS if not m.supported]
FLASH = [False, True]
N_CTX = 512


@pytest.fixture(scope="module")
def tokens():
    """About 200 tokens of real text (the models share SmolLM2's tokenizer)."""
    llm = Llama(model_file(SUPPORTED[0]), n_ctx=N_CTX, verbose=False, vocab_only=True)
    toks = llm.tokenize(haystack_text()[20000:21000].encode())[:200]
    llm.close()
    assert len(toks) == 200
    return toks


def _ours(spec, flash_attn, **kw):
    return Llama(str(model_file(spec)), n_ctx=N_CTX, n_batch=N_CTX, flash_attn=flash_attn, verbose=False, **kw)


def _stock(spec, flash_attn):
    return llama_cpp.Llama(
        str(model_file(spec)), n_ctx=N_CTX, n_batch=N_CTX, flash_attn=flash_attn, n_threads=N_THREADS, verbose=False
    )


def _swa_bytes(llm) -> int:
    """Bytes of the sliding-window cache's part at the end of the sequence state (0 without one)."""
    ctx, flags = llm._ctx.ctx, llama_cpp.LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY
    if _native.context_state_info(ctx)["swa_n_layer"] == 0:
        return 0
    return llama_cpp.llama_state_seq_get_size_ext(ctx, 0, flags) - 8  # without its magic and sequence id


def matrix():
    """(spec, flash attention) parameters with readable ids."""
    return pytest.mark.parametrize(
        "spec,flash_attn",
        [(m, fa) for m in SUPPORTED for fa in FLASH],
        ids=[f"{m.name}-{'fa' if fa else 'nofa'}" for m in SUPPORTED for fa in FLASH],
    )


@matrix()
def test_the_model_is_supported_with_the_expected_layers(spec, flash_attn):
    m = _ours(spec, flash_attn)
    try:
        assert m._engine.unsupported is None and m.metadata["general.architecture"] == spec.arch
        assert (m.kv_n_head, m.kv_n_head_kv) == (spec.n_head, spec.n_head_kv)
        if spec.option("sliding_window"):
            pattern = {"gemma2": 2, "gemma3": 6}[spec.arch]
            assert m.kv_layers == [il for il in range(spec.n_layer) if il % pattern == pattern - 1]
        else:
            assert m.kv_layers == list(range(spec.n_layer))
    finally:
        m.close()


@matrix()
def test_ratio_zero_gives_the_logits_of_stock_llama_cpp_python(spec, flash_attn, tokens):
    """Probe + rewrite at ratio 0 are lossless; the reference decodes in the same two calls."""
    ref = _stock(spec, flash_attn)
    ref.eval(tokens[:-1])
    ref.eval(tokens[-1:])
    expected = last_logits(ref)
    ref.close()
    m = _ours(spec, flash_attn, kv_compress=KVComposePress(0.0, min_tokens=16))
    try:
        got = logits_after(m, tokens)
        assert m.kv_stats["cells_after"] == m.kv_stats["cells_before"] == len(tokens) - 1
        assert np.isfinite(expected).all()
        np.testing.assert_array_equal(got, expected)
    finally:
        m.close()


@matrix()
def test_a_token_level_selection_is_llama_cpp_eviction(spec, flash_attn, tokens):
    """The same tokens in every head are ordinary cells: the composite rewrite writes what
    llama_memory_seq_rm leaves (for iSWA models: in the global cache, the window untouched), and the
    next logits equal llama.cpp's on its own eviction once compacted (state save + restore)."""
    ctx_tokens, last = tokens[:-1], tokens[-1:]
    n = len(ctx_tokens)
    keep = np.sort(np.concatenate([np.random.default_rng(7).choice(n - 1, size=n // 3, replace=False), [n - 1]]))

    ref = _stock(spec, flash_attn)
    ref.eval(ctx_tokens)
    ref_state = evict_with_llama_cpp(ref, n, keep)
    ref_swa = _swa_bytes(ref)
    if not ref_swa:
        ref_logits = logits_after_compacting(ref, ref_state, last)
    ref.close()

    m = _ours(spec, flash_attn)
    try:
        m.eval(ctx_tokens)
        before = seq_state(m)
        sel = np.ascontiguousarray(np.broadcast_to(keep.astype(np.int32), (m.kv_n_layer, m.kv_n_head_kv, keep.size)))
        result = _native.context_compose(m._ctx.ctx, sel, expected_cells=n)
        assert result["cells_after"] == keep.size and result["pos_max"] == n - 1
        ours = seq_state(m)
        if ref_swa:
            # llama.cpp evicts from both caches; ours rewrites the global one and keeps the window
            swa = _swa_bytes(m)
            assert swa > 0
            assert ours[: len(ours) - swa] == ref_state[: len(ref_state) - ref_swa]
            assert ours[len(ours) - swa :] == before[len(before) - swa :]
        else:
            assert ours == ref_state
            m.eval(last)
            np.testing.assert_array_equal(last_logits(m), ref_logits)
    finally:
        m.close()


@matrix()
def test_a_composite_rewrite_is_the_same_through_the_state_and_the_tensors(spec, flash_attn, tokens):
    """A per-head KVCompose selection written by the tensor path equals the state path's bytes and
    next logits, and the compressed cache round-trips byte for byte through save/load state."""
    ctx_tokens, last = tokens[:-1], tokens[-1:]
    n = len(ctx_tokens)
    press = KVComposePress(0.5, min_tokens=16)
    m = _ours(spec, flash_attn)
    try:
        probe = m.kv_probe(ctx_tokens, [press])
        selection = press.select(press.score(probe), press.n_kept(n), forced=[n - 1])
        assert selection.shape == (m.kv_n_layer, m.kv_n_head_kv, press.n_kept(n))
        if selection.shape[0] * selection.shape[1] > 1:  # heads or layers keep different tokens
            flat = selection.reshape(-1, selection.shape[-1])
            assert any(not np.array_equal(flat[0], r) for r in flat[1:])
        before = m.save_state()

        state = _native.context_compose(m._ctx.ctx, selection, expected_cells=n)
        expected = seq_state(m)
        saved = m.save_state()
        m.eval(last)
        expected_logits = last_logits(m)
        assert np.isfinite(expected_logits).all()

        m.load_state(saved)  # the compressed cache through llama.cpp's state round trip
        assert seq_state(m) == expected

        if probe.in_place:
            m.load_state(before)
            tensors = _native.context_compose_tensors(
                m._ctx.ctx, m._kv_capture, np.arange(n, dtype=np.int32), selection
            )
            assert tensors == state
            assert seq_state(m) == expected
            m.n_tokens = n
            m.eval(last)
            np.testing.assert_array_equal(last_logits(m), expected_logits)
        else:
            assert spec.option("sliding_window"), "only iSWA probes may see the context out of place"
    finally:
        m.close()


@matrix()
def test_the_captured_probe_attention_is_a_distribution(spec, flash_attn, tokens, monkeypatch):
    """Every probe query's captured attention sums to 1 over the cells it sees (kq_soft_max-{il}
    pooled on the backend, or recomputed there from the flash-attention node's q and k: softcap, GQA,
    sliding-window masks); the host loops over the same tensors give the same scores; with flash attention
    off, the host's recomputation equals llama.cpp's own softmax where it can recompute it. With flash
    attention the backend also writes each layer's output in place of ggml's kernel ("once"): every layer's,
    scoring what the kernel's activations score to the kernel's own rounding."""
    ctx_tokens = tokens[:-1]
    m = _ours(spec, flash_attn)
    try:
        runs = {}
        for recompute in [None, "host", False, True] if not flash_attn else [None, "host", "once"]:
            # the same activations for the backend and the host: ggml's kernel, except in "once"
            monkeypatch.setenv("KVC_KEEP_FLASH_KERNEL", "0" if recompute == "once" else "1")
            m._kv_capture.set_reduce("backend" if recompute in (None, "once") else "host")
            if recompute in (False, True):
                m._kv_capture.set_recompute(recompute)
            m.reset()
            m.eval(ctx_tokens[:-8])
            try:
                mx, mean = m._engine.captured(lambda: m.eval(ctx_tokens[-8:]), len(ctx_tokens))
            except _native.NativeError as e:  # recomputing a softcapped kq_soft_max is refused by name
                assert recompute is True and spec.arch == "gemma2" and "softcap" in str(e)
                continue
            assert mean.shape == (m.kv_n_layer, m.kv_n_head, len(ctx_tokens))
            np.testing.assert_allclose(mean.sum(axis=-1), 1.0, atol=1e-3)
            assert (mx <= 1.0 + 1e-6).all() and (mean >= 0).all() and (mx > 0).any()
            runs[recompute] = mean
            if recompute in (None, "once"):
                assert m._kv_capture.fallback == "", m._kv_capture.fallback
            assert m._kv_capture.n_outputs == (m._engine.shape.n_model_layers if recompute == "once" else 0)
        np.testing.assert_allclose(runs[None], runs["host"], atol=1e-4)  # backend against host, same activations
        if "once" in runs:
            np.testing.assert_allclose(runs["once"], runs[None], atol=2e-3)
        if False in runs and True in runs:
            np.testing.assert_allclose(runs[True], runs[False], atol=1e-4)
    finally:
        m.close()


@matrix()
def test_a_compressed_session_saves_and_loads(spec, flash_attn, tokens, tmp_path):
    m = _ours(spec, flash_attn, kv_compress=KVComposePress(0.5, min_tokens=16))
    try:
        m.compress_context(tokens[:-1])
        cells = m.kv_cells
        assert cells == KVComposePress(0.5).n_kept(len(tokens) - 1)
        m.save_session(tmp_path / "s.kvc")
        expected = greedy(m, tokens, 4)
        logits = last_logits(m)
    finally:
        m.close()
    loaded = Llama.load_session(tmp_path / "s.kvc", n_ctx=N_CTX, n_batch=N_CTX, flash_attn=flash_attn, verbose=False)
    try:
        assert loaded.kv_cells == cells and loaded.kv_history == tokens[:-1]
        assert greedy(loaded, tokens, 4) == expected
        np.testing.assert_array_equal(last_logits(loaded), logits)
    finally:
        loaded.close()


# ---- refused architectures ------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", REFUSED, ids=[m.name for m in REFUSED])
def test_an_unsupported_architecture_is_refused_by_name(spec):
    path = str(model_file(spec))
    with pytest.raises(NotImplementedError, match=repr(spec.arch)):
        Llama(path, n_ctx=256, verbose=False, kv_compress=KVComposePress(0.5))
    m = Llama(path, n_ctx=256, verbose=False)  # without a press it is plain llama-cpp-python
    try:
        assert m._engine.unsupported is not None and m._kv_capture is None
        with pytest.raises(NotImplementedError, match=repr(spec.arch)):
            m.kv_compress = KVComposePress(0.5)
        assert m.kv_compress is None
    finally:
        m.close()


@pytest.mark.parametrize(
    "spec", [m for m in REFUSED if m.arch != "t5"], ids=[m.name for m in REFUSED if m.arch != "t5"]
)
def test_a_refused_model_keeps_its_cache_untouched(spec, tokens):
    """compress_context and kv_probe with an explicit press refuse before touching the cache (t5's
    decoder needs an encoder pass first, which llama-cpp-python's eval does not make)."""
    m = Llama(str(model_file(spec)), n_ctx=256, verbose=False)
    try:
        m.eval(tokens[:50])
        before = seq_state(m)
        for call in (
            lambda: m.compress_context(tokens[:60], KVComposePress(0.5)),
            lambda: m.kv_probe(tokens[:60], [KVComposePress(0.5)]),
        ):
            with pytest.raises(NotImplementedError, match=repr(spec.arch)):
                call()
            assert seq_state(m) == before and m.n_tokens == 50
    finally:
        m.close()
