"""Gemma 3 (interleaved sliding-window attention): the global layers' cache is compressed, the
sliding-window cache is left exactly as it was."""

import ctypes
import dataclasses

import llama_cpp
import numpy as np
import pytest

from helpers import last_logits, press_ids, press_list, seq_state
from kvbench.haystack import haystack_text, passkey_cases
from kvbench.runner import gemma3_270m_path
from pykvcompose import KVComposePress, Llama, _native, support
from pykvcompose.demo import answer
from pykvcompose.presses import SnapKVPress, StreamingLLMPress

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def gemma_path():
    return gemma3_270m_path()


@pytest.fixture(scope="module")
def gemma(gemma_path):
    m = Llama(gemma_path, n_ctx=1024, n_batch=256, verbose=False)
    yield m
    m.close()


@pytest.fixture(scope="module")
def doc(gemma):
    """~620 tokens: more than the 512-token window, so the sliding-window cache has dropped some."""
    toks = gemma.tokenize(haystack_text()[30000:33000].encode())[:620]
    assert len(toks) == 620
    return toks


def swa_section(llm) -> bytes:
    """The sliding-window cache's part of the sequence state, as llama.cpp writes it alone."""
    ctx, flags = llm._ctx.ctx, llama_cpp.LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY
    size = llama_cpp.llama_state_seq_get_size_ext(ctx, 0, flags)
    buf = (ctypes.c_uint8 * size)()
    assert llama_cpp.llama_state_seq_get_data_ext(ctx, buf, size, 0, flags) == size
    return bytes(buf)[8:]  # without the magic and sequence id


def test_the_global_layers_are_the_compressed_ones(gemma):
    assert gemma.kv_layers == [5, 11, 17]  # llama.cpp's Gemma 3 pattern: every sixth layer is global
    assert gemma.kv_n_layer == 3 and gemma._engine.unsupported is None


ISWA_PRESSES = press_list(0.5) + press_list(0.75, per_head=False)


@pytest.mark.parametrize("press", ISWA_PRESSES, ids=press_ids(ISWA_PRESSES))
def test_compression_rewrites_the_global_cache_and_keeps_the_window(gemma, doc, press):
    gemma.kv_compress = None
    gemma.reset()
    # the press's probe prefills the context in the same calls (llama.cpp's values depend on the batch split)
    cut = len(doc) - press.probe()[1] if press.probe() and press.probe()[0] == "window" else len(doc)
    gemma.eval(doc[:cut])
    gemma.eval(doc[cut:])
    window = swa_section(gemma)
    info = _native.context_state_info(gemma._ctx.ctx)
    assert (info["n_cells"], info["n_layer"], info["swa_n_layer"]) == (620, 3, 15)
    assert info["swa_n_cells"] == 512  # positions 108..619

    gemma.compress_context(doc, press)
    after = _native.context_state_info(gemma._ctx.ctx)
    assert after["n_cells"] == press.n_kept(620) == gemma.kv_cells
    assert after["n_layer"] == 3 and after["pos_max"] == 619
    assert swa_section(gemma) == window  # byte for byte, token-level presses included
    if press.per_head and not isinstance(press, StreamingLLMPress):  # composite: layers keep different tokens
        assert gemma.kv_selection.shape == (3, 1, after["n_cells"])
        assert not (gemma.kv_selection[0] == gemma.kv_selection[1]).all()


def test_a_value_refit_of_an_iswa_cache_is_refused_before_anything_is_written(gemma, doc):
    """kvc_refit does not map the sliding-window cache's layers: unsupported, and the sequence is unchanged."""
    gemma.kv_compress = None
    cap = gemma._engine.capture
    cap.set_queries(1, 64)
    try:
        gemma.kv_probe(doc, [KVComposePress(0.5, scoring="reconstruct")])
    finally:
        cap.set_queries(0, 0)
    before = seq_state(gemma)
    sel = np.ascontiguousarray(np.broadcast_to(np.arange(0, 620, 2, dtype=np.int32), (3, 1, 310)))
    with pytest.raises(_native.UnsupportedCacheError, match="sliding-window"):
        _native.context_compose(gemma._ctx.ctx, sel, expected_cells=620, refit=(cap, 0.1))
    assert seq_state(gemma) == before


def test_identity_rewrite_keeps_the_next_logits(gemma, doc):
    gemma.kv_compress = None
    gemma.reset()
    gemma.eval(doc[:-1])
    before = seq_state(gemma)
    identity = np.broadcast_to(np.arange(619, dtype=np.int32), (3, 1, 619))
    _native.context_compose(gemma._ctx.ctx, np.ascontiguousarray(identity), expected_cells=619)
    assert seq_state(gemma) == before
    gemma.eval(doc[-1:])
    got = last_logits(gemma)
    gemma.reset()
    gemma.eval(doc[:-1])  # the same batches without the rewrite (logits depend on how a prompt is split)
    gemma.eval(doc[-1:])
    np.testing.assert_array_equal(got, last_logits(gemma))


def test_a_prompt_longer_than_the_cache_streams_through_it(gemma_path):
    text = haystack_text()[40000:52000]
    m = Llama(gemma_path, n_ctx=1024, n_batch=256, verbose=False, kv_compress=SnapKVPress(0.5))
    toks = m.tokenize(text.encode())[:1800]
    out = list(m.create_completion(toks, max_tokens=8, temperature=0.0)["choices"][0]["text"])
    assert out
    assert m.kv_compressions >= 1 and m.kv_cells <= 1024 and m.n_tokens >= 1800
    info = _native.context_state_info(m._ctx.ctx)
    assert info["pos_max"] == m.n_tokens - 1 and info["n_cells"] == m.kv_cells
    m.close()


def test_a_cache_too_small_for_the_window_keeps_the_n_ctx_limit(gemma_path):
    # the sliding-window cache is as large as n_ctx and is never compressed: it must hold 512 + a batch
    m = Llama(gemma_path, n_ctx=512, n_batch=128, verbose=False, kv_compress=SnapKVPress(0.5))
    assert m._n_ctx == 512
    toks = m.tokenize(haystack_text()[40000:46000].encode())[:700]
    with pytest.raises(ValueError, match="exceed context window of 512"):
        m.create_completion(toks, max_tokens=1)
    m.close()


def test_a_session_round_trips(gemma, gemma_path, doc, tmp_path):
    gemma.kv_compress = KVComposePress(0.5, min_tokens=16)
    gemma.reset()
    gemma.compress_context(doc[:-1])
    gemma.save_session(tmp_path / "s.kvc")
    cells = gemma.kv_cells
    expected = answer(gemma, doc, 6)["text"]  # continues on the compressed context
    loaded = Llama.load_session(tmp_path / "s.kvc", model_path=gemma_path, n_ctx=1024, n_batch=256, verbose=False)
    assert loaded.kv_cells == cells and loaded.kv_history == doc[:-1]
    assert answer(loaded, doc, 6)["text"] == expected
    loaded.close()


def test_pass_key_retrieval_with_the_global_layers_compressed(gemma):
    """One of the measured cases (bench/passkey.py --model gemma3-270m has them all)."""
    tok = lambda s: gemma.tokenize(s.encode(), add_bos=False)  # noqa: E731
    ((_, key, prompt),) = passkey_cases(tok, 300, [0.2])
    toks = gemma.tokenize(prompt.encode())
    gemma.kv_compress = None
    gemma.reset()
    assert str(key) in answer(gemma, toks, 8)["text"]
    gemma.kv_compress = KVComposePress(0.5)
    gemma.reset()
    assert str(key) in answer(gemma, toks, 8)["text"]
    assert gemma.kv_cells < len(toks)


def test_an_unknown_sliding_window_layout_is_refused_naming_the_architecture(gemma, monkeypatch):
    monkeypatch.setitem(gemma.metadata, "general.architecture", "mystery")
    engine = gemma._engine
    shape = dataclasses.replace(
        engine.shape,
        arch="mystery",
        layers=support.full_attention_layers(
            "mystery", gemma.metadata, engine.shape.n_model_layers, engine.shape.n_swa
        ),
    )
    assert shape.layers is None
    shape.layers = []
    monkeypatch.setattr(engine, "shape", shape)
    monkeypatch.setattr(engine, "unsupported", support.why_unsupported(gemma._model.model, gemma.metadata, shape))
    with pytest.raises(NotImplementedError, match="'mystery'"):
        gemma.kv_compress = KVComposePress(0.5)


def test_a_wrong_layer_pattern_is_caught_before_compressing(gemma, doc, monkeypatch):
    engine = gemma._engine
    monkeypatch.setattr(engine, "shape", dataclasses.replace(engine.shape, layers=[3, 7]))
    monkeypatch.setattr(engine, "_layers_checked", False)
    gemma.kv_compress = None
    gemma.reset()
    gemma.eval(doc[:100])
    with pytest.raises(NotImplementedError, match="holds 3 layers"):
        engine.check_cache_layers()


def test_the_bench_chat_style_writes_gemma_turns_without_a_template(gemma):
    """Gemma 3 270M's GGUF has no tokenizer.chat_template: the bench's chat style writes Gemma's turns
    (llama-cpp-python's "gemma" format), whose markers are single special tokens of the vocabulary; a
    model with neither a template nor a known architecture is refused naming its architecture."""
    from kvbench import runner

    assert not gemma.metadata.get("tokenizer.chat_template")
    head, tail = runner.chat_prompt(gemma, "The pass key is 123.", "What is the pass key? The pass key is")
    assert head == "<start_of_turn>user\nThe pass key is 123."
    assert tail == "\n\nWhat is the pass key?<end_of_turn>\n<start_of_turn>model\n"
    toks = gemma.tokenize((head + tail).encode(), special=True)
    for marker, times in (("<start_of_turn>", 2), ("<end_of_turn>", 1)):
        marker_tokens = gemma.tokenize(marker.encode(), add_bos=False, special=True)
        assert len(marker_tokens) == 1 and toks.count(marker_tokens[0]) == times

    class NoTemplate:  # a model whose GGUF names no template and an architecture without a known format
        metadata = {"general.architecture": "mamba"}

    with pytest.raises(ValueError, match="mamba model has none"):
        runner.chat_prompt(NoTemplate(), "x", "y")
