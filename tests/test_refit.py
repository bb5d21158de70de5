"""Value refit of composed cells (the C API's ``kvc_refit``; measured as no gain, so no press uses it, see
docs/ablations.md): the C++ least squares against a numpy re-implementation on the same cache and reference
queries, what it changes and what it keeps, and failures that leave the cache as it was."""

import numpy as np
import pytest

from helpers import N_THREADS, seq_state
from oracles import np_attention_error, np_refit_values, np_state_kv
from pykvcompose import KVComposePress, Llama, _capture, _native

RIDGE = 0.1  # relative to the mean diagonal of A^T A, as measured

pytestmark = pytest.mark.model


@pytest.fixture(scope="module", params=[False, True], ids=["flash-off", "flash-on"])
def refit_llm(request, model_path):
    m = Llama(model_path, n_ctx=1024, n_threads=N_THREADS, flash_attn=request.param, verbose=False)
    yield m
    m.close()


def probe_and_refit(llm, tokens, ratio):
    """Probe ``tokens`` (reconstruct, every query kept as a reference), select as published KVCompose does and
    compose with the values refit."""
    press = KVComposePress(ratio, scoring="reconstruct")
    cap = llm._engine.capture
    cap.set_queries(1, 512)
    try:
        probe = llm.kv_probe(tokens, [press])
    finally:
        cap.set_queries(0, 0)
    full = seq_state(llm)
    kept = [cap.queries(layer) for layer in range(llm.kv_n_layer)]
    sel = press.compress(probe, press.n_kept(len(tokens)), forced=[len(tokens) - 1])[2]
    stats = _native.context_compose(llm._ctx.ctx, sel, expected_cells=len(tokens), refit=(cap, RIDGE))
    return full, kept, stats, seq_state(llm), sel


def test_refit_matches_numpy_least_squares(refit_llm, prompt_tokens):
    """The values written are the ridge least-squares solution over the kept reference queries (numpy, float64,
    from the same full cache); the keys are the selected keys, untouched; the refit reproduces attention over
    all keys better than the selected values do."""
    tokens = prompt_tokens[:300]
    full, kept, stats, composed, sel = probe_and_refit(refit_llm, tokens, 0.75)
    assert stats["cells_after"] == sel.shape[-1]
    n, _, K, V = np_state_kv(full)
    assert n == len(tokens)
    _, _, Kc, Vc = np_state_kv(composed)
    queries, scales = [q for q, _ in kept], [s for _, s in kept]
    D = queries[0].shape[2]
    assert all(q.shape[0] == len(tokens) for q in queries)  # 300 < REFIT_QUERIES: every probe query
    assert all(s == pytest.approx(D**-0.5) for s in scales)
    expected = np_refit_values(K, V, sel, queries, scales, RIDGE)
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


def test_reference_queries_are_every_kth_probe_query_up_to_the_limit(llm, prompt_tokens):
    """Every k-th of the probe's queries is kept, in every layer, at most n_max: query t of a reconstruct probe
    is token t's query again, so the kept rows of a 1-in-3 capture are rows 0, 3, 6, ... of a 1-in-1 capture."""
    cap = llm._engine.capture
    press = KVComposePress(0.5, scoring="reconstruct")
    kept = {}
    for every, n_max in ((1, 200), (3, 50)):
        cap.set_queries(every, n_max)
        try:
            llm.kv_probe(prompt_tokens[:200], [press])
        finally:
            cap.set_queries(0, 0)
        kept[every] = [cap.queries(layer)[0] for layer in range(llm.kv_n_layer)]
    assert {q.shape[0] for q in kept[1]} == {200} and {q.shape[0] for q in kept[3]} == {50}
    for every_one, every_third in zip(kept[1], kept[3]):
        np.testing.assert_allclose(every_third, every_one[0:150:3], rtol=1e-4, atol=1e-4)
    llm.kv_probe(prompt_tokens[:200], [press])  # without set_queries: none kept
    assert cap.queries(0)[0].shape[0] == 0
    with pytest.raises(_native.InvalidArgumentError):
        cap.set_queries(0, 10)


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
        _native.context_compose(llm._ctx.ctx, sel, expected_cells=200, refit=(llm._engine.capture, RIDGE))
    assert seq_state(llm) == before
    with _capture.Capture() as empty, pytest.raises(_native.InvalidArgumentError, match="ridge"):
        _native.context_compose(llm._ctx.ctx, sel, expected_cells=200, refit=(empty, 0.0))
    assert seq_state(llm) == before
