"""Bad input gets a clear Python exception, never a crash."""

import llama_cpp
import numpy as np
import pytest

from helpers import seq_state
from pykvcompose import KVComposePress, Llama, _native

pytestmark = pytest.mark.model


def test_non_press_is_refused(llm):
    with pytest.raises(TypeError, match="kv_compress"):
        llm.kv_compress = 0.5


def test_a_vocab_only_model_tokenizes_and_refuses_presses(model_path):
    """vocab_only=True loads no hyperparameters: llama_model_n_head would abort the process."""
    import pathlib

    m = Llama(pathlib.Path(model_path), vocab_only=True, verbose=False)  # a Path, as users write it
    try:
        assert m.tokenize(b"hello world") == llama_cpp.Llama(model_path, vocab_only=True, verbose=False).tokenize(
            b"hello world"
        )
        with pytest.raises(NotImplementedError, match="vocab_only"):
            m.kv_compress = KVComposePress(0.5)
    finally:
        m.close()


def test_prompt_longer_than_context(model_path, prompt_tokens):
    """A press that frees no cells cannot make a long prompt fit (ratio > 0: see test_streaming)."""
    m = Llama(model_path, n_ctx=256, verbose=False, kv_compress=KVComposePress(0.0, min_tokens=16))
    text = m.detokenize(prompt_tokens).decode(errors="ignore")
    with pytest.raises(ValueError, match="exceed context window"):
        m(text, max_tokens=4)
    with pytest.raises(ValueError, match="exceed context window"):
        next(m.generate(prompt_tokens))
    # the instance stays usable
    m.reset()
    out = m("Hello", max_tokens=2)
    assert out["choices"][0]["text"] is not None
    m.close()


def test_reconstruct_probe_runs_in_chunks_when_the_cache_is_small(model_path, prompt_tokens):
    n = len(prompt_tokens)
    m = Llama(
        model_path,
        n_ctx=n + 64,
        n_batch=64,
        verbose=False,
        kv_compress=KVComposePress(0.5, min_tokens=16, scoring="reconstruct"),
    )
    gen = m.generate(prompt_tokens, temp=0.0)
    next(gen)
    gen.close()
    assert m.kv_stats["probe"].startswith("reconstruct, chunks of")
    assert m.kv_stats["cells_after"] == (n - 1) // 2
    m.close()


@pytest.fixture(scope="module")
def state(llm, prompt_tokens):
    llm.kv_compress = None
    llm.reset()
    llm.eval(prompt_tokens[:40])
    return seq_state(llm)


def test_state_parse_describes_the_sequence(state, llm):
    info = _native.state_parse(state)
    assert info["n_cells"] == 40 and info["n_layer"] == llm.kv_n_layer
    assert info["positions"].tolist() == list(range(40))
    assert info["v_trans"] == 1


def test_truncated_and_corrupted_states_raise(state, llm):
    sel = np.broadcast_to(np.arange(0, 40, 2, dtype=np.int32), (llm.kv_n_layer, llm.kv_n_head_kv, 20))
    for cut in list(range(0, 64)) + list(range(64, len(state), 997)) + [len(state) - 1]:
        with pytest.raises(_native.CorruptStateError):
            _native.state_compose(state[:cut], sel)
    with pytest.raises(_native.CorruptStateError, match="trailing"):
        _native.state_parse(state + b"\0")
    with pytest.raises(_native.CorruptStateError, match="magic"):
        _native.state_parse(b"\0" * 4 + state[4:])
    bad = bytearray(state)
    bad[12:16] = (2**31).to_bytes(4, "little")  # a huge cell count
    with pytest.raises(_native.CorruptStateError, match="cell count"):
        _native.state_parse(bytes(bad))
    rng = np.random.default_rng(0)
    for _ in range(200):  # random byte flips: an error or a valid parse, never a crash
        b = bytearray(state)
        for i in rng.integers(0, len(b), size=4):
            b[i] = rng.integers(0, 256)
        try:
            _native.state_compose(bytes(b), sel)
        except _native.NativeError:
            pass


@pytest.mark.parametrize(
    "make_sel,match",
    [
        (lambda L, H: np.zeros((L, H, 3), np.int32), "ascending"),
        (lambda L, H: np.broadcast_to(np.array([0, 5, 40], np.int32), (L, H, 3)), "ascending"),
        (lambda L, H: np.broadcast_to(np.array([-1, 5, 7], np.int32), (L, H, 3)), "ascending"),
        (lambda L, H: np.zeros((L - 1, H, 1), np.int32), "selection is"),
        (lambda L, H: np.zeros((L, H, 41), np.int32), "selection is"),
    ],
)
def test_bad_selections_raise(state, llm, make_sel, match):
    with pytest.raises(ValueError, match=match):
        _native.state_compose(state, make_sel(llm.kv_n_layer, llm.kv_n_head_kv))


def test_live_compose_failure_leaves_the_cache_untouched(llm, prompt_tokens):
    llm.kv_compress = None
    llm.reset()
    llm.eval(prompt_tokens[:40])
    before = seq_state(llm)
    with pytest.raises(ValueError, match="expected 39"):
        _native.context_compose(
            llm._ctx.ctx, np.zeros((llm.kv_n_layer, llm.kv_n_head_kv, 1), np.int32), expected_cells=39
        )
    with pytest.raises(ValueError):
        _native.context_compose(llm._ctx.ctx, np.zeros((llm.kv_n_layer, llm.kv_n_head_kv, 2), np.int32))
    assert seq_state(llm) == before


def test_scoring_rejects_bad_shapes():
    with pytest.raises(ValueError):
        _native.kvcompose_score(np.zeros((2, 9, 5), np.float32), n_head_kv=2)  # 9 heads, 2 groups
    with pytest.raises(ValueError, match="more forced"):
        _native.select_top(np.zeros((1, 5), np.float32), 1, forced=[0, 1])
    with pytest.raises(ValueError):
        _native.select_top(np.zeros((1, 5), np.float32), 6)
    # NaN scores rank last instead of breaking the sort
    got = _native.select_top(np.array([[np.nan, 1, np.nan, 2, 0]], np.float32), 3)
    assert got.tolist() == [[1, 3, 4]]
