"""Value refit of composed cells (``KVComposePress(refit_values=True)``, ``kvc_refit``): the C++ least squares
against a numpy re-implementation on the same cache and reference queries, what it changes and what it keeps,
and failures that leave the cache as it was."""

import numpy as np
import pytest

from helpers import N_THREADS, seq_state
from oracles import np_attention_error, np_refit_values, np_state_kv
from pykvcompose import KVComposePress, Llama, _capture, _native
from pykvcompose.presses.kvcompose_press import REFIT_RIDGE

pytestmark = pytest.mark.model


@pytest.fixture(scope="module", params=[False, True], ids=["flash-off", "flash-on"])
def refit_llm(request, model_path):
    m = Llama(model_path, n_ctx=1024, n_threads=N_THREADS, flash_attn=request.param, verbose=False)
    yield m
    m.close()


def probe_and_refit(llm, tokens, ratio):
    press = KVComposePress(ratio, scoring="reconstruct", refit_values=True)
    probe = llm.kv_probe(tokens, [press])
    full = seq_state(llm)
    cap = llm._engine.capture
    kept = [cap.queries(layer) for layer in range(llm.kv_n_layer)]
    stats = llm.kv_apply(press, probe)
    return full, kept, stats, seq_state(llm), llm._engine.conv.selection


def test_refit_matches_numpy_least_squares(refit_llm, prompt_tokens):
    """The values written are the ridge least-squares solution over the kept reference queries (numpy, float64,
    from the same full cache); the keys are the selected keys, untouched; the refit reproduces attention over
    all keys better than the selected values do."""
    tokens = prompt_tokens[:300]
    full, kept, stats, composed, sel = probe_and_refit(refit_llm, tokens, 0.75)
    assert stats["refit"] and stats["cells_after"] == sel.shape[-1]
    n, _, K, V = np_state_kv(full)
    assert n == len(tokens)
    _, _, Kc, Vc = np_state_kv(composed)
    queries, scales = [q for q, _ in kept], [s for _, s in kept]
    D = queries[0].shape[2]
    assert all(q.shape[0] == len(tokens) for q in queries)  # 300 < REFIT_QUERIES: every probe query
    assert all(s == pytest.approx(D**-0.5) for s in scales)
    expected = np_refit_values(K, V, sel, queries, scales, REFIT_RIDGE)
    for layer in range(len(K)):
        heads = [K[layer][sel[layer, g], g * D : (g + 1) * D] for g in range(sel.shape[1])]
        np.testing.assert_array_equal(Kc[layer], np.concatenate(heads, axis=1))
        scale = np.abs(expected[layer]).max()
        np.testing.assert_allclose(Vc[layer], expected[layer], rtol=0, atol=5e-3 * scale)
    selected = [
        np.concatenate([V[l][sel[l, g], g * D : (g + 1) * D] for g in range(sel.shape[1])], 1) for l in range(len(V))
    ]
    assert not np.allclose(Vc[5], selected[5], atol=1e-3)  # the values did change
    before = np_attention_error(K, V, selected, sel, queries, scales)
    after = np_attention_error(K, V, Vc, sel, queries, scales)
    assert after < 0.7 * before, (before, after)


def test_reference_queries_are_spread_over_a_long_probe(llm, prompt_tokens):
    """Longer than REFIT_QUERIES: every k-th of the reconstruct probe's queries is kept, the same rows in every
    layer, at most REFIT_QUERIES of them."""
    from pykvcompose.presses.kvcompose_press import REFIT_QUERIES

    cap = llm._engine.capture
    cap.set_queries(3, 50)
    try:
        llm.kv_probe(prompt_tokens[:200], [KVComposePress(0.5, scoring="reconstruct")])
    finally:
        cap.set_queries(0, 0)
    counts = {cap.queries(layer)[0].shape[0] for layer in range(llm.kv_n_layer)}
    assert counts == {50}
    # the capture's queries are those of positions 200 + 3i: the same token's query in both passes
    assert REFIT_QUERIES >= 256


def test_refit_only_where_the_reconstruct_probe_ran(llm, prompt_tokens):
    """The lookahead (a prompt with its question) keeps the selected values; compress_context refits."""
    press = KVComposePress(0.75, refit_values=True)
    llm.reset()
    assert llm.compress_context(prompt_tokens[:300], press)["refit"] is True
    llm.reset()
    llm.kv_compress = press
    try:
        next(llm.generate(prompt_tokens[:300], temp=0.0, top_k=1))
        assert llm.kv_stats["refit"] is False and llm.kv_stats["probe"].startswith("lookahead")
    finally:
        llm.kv_compress = None
    llm.reset()
    assert llm.compress_context(prompt_tokens[:300], KVComposePress(0.75))["refit"] is False


def test_a_failed_refit_leaves_the_cache_as_it_was(llm, prompt_tokens):
    """No reference queries, or a ridge that is not positive: a clear error, and the sequence's bytes are those
    of before the call."""
    tokens = prompt_tokens[:200]
    llm.kv_probe(tokens, [KVComposePress(0.5, scoring="reconstruct")])  # no refit asked: no queries kept
    before = seq_state(llm)
    sel = np.ascontiguousarray(
        np.broadcast_to(np.arange(0, 200, 2, dtype=np.int32), (llm.kv_n_layer, llm.kv_n_head_kv, 100))
    )
    with pytest.raises(_native.InvalidArgumentError, match="no reference queries"):
        _native.context_compose(llm._ctx.ctx, sel, expected_cells=200, refit=(llm._engine.capture, REFIT_RIDGE))
    assert seq_state(llm) == before
    with _capture.Capture() as empty, pytest.raises(_native.InvalidArgumentError, match="ridge"):
        _native.context_compose(llm._ctx.ctx, sel, expected_cells=200, refit=(empty, 0.0))
    assert seq_state(llm) == before
    with pytest.raises(ValueError, match="refit_values"):
        KVComposePress(0.5, refit_values="yes")
