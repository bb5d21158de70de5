"""The C++ scoring and selection against an independent numpy re-implementation of KVCompose
(the authors' algorithm as in kvpress's KVComposePress), on attention captured from the model."""

import numpy as np
import pytest

from helpers import seq_state
from oracles import np_consensus, np_layer_budgets, np_scores, np_select
from pykvcompose import KVComposePress, _native

pytestmark = pytest.mark.model


@pytest.mark.parametrize(
    "press",
    [
        KVComposePress(compression_ratio=0.5, min_tokens=16),
        KVComposePress(compression_ratio=0.75, scoring="window", window=48, min_tokens=16),
        KVComposePress(
            compression_ratio=0.6,
            agg_task="mean",
            agg_group="max",
            agg_head="max",
            add_v_norm=True,
            keep_token_lower_bound=4,
            min_tokens=16,
        ),
        KVComposePress(compression_ratio=0.3, scoring="window", add_mean_across_heads=False, min_tokens=16),
    ],
    ids=["reconstruct", "window", "options", "window-no-stabiliser"],
)
def test_native_scoring_matches_numpy(llm, prompt_tokens, press):
    llm.kv_compress = press
    llm.reset()
    gen = llm.generate(prompt_tokens, temp=0.0)
    next(gen)
    gen.close()
    n = len(prompt_tokens) - 1
    hs = llm.kv_head_scores
    assert hs.shape == (llm.kv_n_layer, llm.kv_n_head, n)
    assert np.all(hs >= 0) and np.any(hs > 0)

    kv_scores, selection, stats = llm.kv_scores, llm.kv_selection, dict(llm.kv_stats)
    vn = None
    if press.add_v_norm:
        # value norms of the same prefill, from the state bytes (checked against numpy below)
        llm.kv_compress = None
        llm.reset()
        llm.eval(prompt_tokens[:-1])
        vn = _native.state_norms(seq_state(llm), "v", llm.kv_n_head_kv)
    expected = np_scores(hs, llm.kv_n_head_kv, press.agg_group, vn, press.add_mean_across_heads)
    np.testing.assert_array_equal(kv_scores, expected)

    budgets = np_layer_budgets(kv_scores, press.compression_ratio, press.agg_head, press.keep_token_lower_bound)
    assert stats["layer_budgets"] == budgets.tolist()
    c = press.n_kept(n)
    np.testing.assert_array_equal(selection, np_select(kv_scores, c, [n - 1]))  # each head by its own scores
    for consensus in (0.4, 1.0):  # what a StreamPolicy's question_consensus asks of the selection
        ranked = _native.scores_consensus(kv_scores, consensus)
        np.testing.assert_allclose(ranked, np_consensus(kv_scores, consensus), rtol=2e-6)
        np.testing.assert_array_equal(
            press.select(kv_scores, c, [n - 1], consensus=consensus), np_select(ranked, c, [n - 1])
        )
    blended = press.select(kv_scores, c, [n - 1], consensus=1.0)
    assert (blended == blended[0, 0]).all()  # every head keeps the same tokens
    assert stats["cells_after"] == c


def test_window_probe_attention_rows_sum_to_one(llm, prompt_tokens):
    """Window-probe queries see only context keys, so the mean attention per head sums to 1."""
    llm.kv_compress = KVComposePress(compression_ratio=0.5, scoring="window", window=32, agg_task="mean", min_tokens=16)
    llm.reset()
    gen = llm.generate(prompt_tokens, temp=0.0)
    next(gen)
    gen.close()
    np.testing.assert_allclose(llm.kv_head_scores.sum(axis=-1), 1.0, atol=2e-3)


def test_reconstruct_probe_differs_from_window(llm, prompt_tokens):
    runs = {}
    for scoring in ("reconstruct", "window"):
        llm.kv_compress = KVComposePress(compression_ratio=0.5, scoring=scoring, min_tokens=16)
        llm.reset()
        gen = llm.generate(prompt_tokens, temp=0.0)
        next(gen)
        gen.close()
        runs[scoring] = llm.kv_selection.copy()
        assert llm.kv_stats["probe"].startswith(scoring)
    assert not np.array_equal(runs["reconstruct"], runs["window"])


def test_value_norms_match_numpy_on_state(llm, prompt_tokens):
    """Value norms parsed in C++ equal numpy's, read from the raw (transposed f16) state bytes."""
    llm.kv_compress = None
    llm.reset()
    llm.eval(prompt_tokens[:64])
    data = seq_state(llm)
    norms = _native.state_norms(data, "v", llm.kv_n_head_kv)
    info = _native.state_parse(data)
    assert info["v_trans"] == 1 and info["v_type"] == 1  # f16
    n_cells, L = info["n_cells"], info["n_layer"]
    # walk the documented layout: header, cells, K sections, then transposed V sections
    off = 12 + 4 + n_cells * 12 + 8
    for _ in range(L):
        row = int(np.frombuffer(data, np.uint64, 1, off + 4)[0])
        off += 12 + row * n_cells
    for il in range(L):
        n_embd = int(np.frombuffer(data, np.uint32, 1, off + 8)[0])
        v = np.frombuffer(data, np.float16, n_embd * n_cells, off + 12).reshape(n_embd, n_cells).astype(np.float64)
        off += 12 + 2 * n_embd * n_cells
        ref = np.sqrt((v.reshape(llm.kv_n_head_kv, -1, n_cells) ** 2).sum(axis=1))
        np.testing.assert_allclose(norms[il], ref, rtol=1e-5)
    assert off == len(data)


@pytest.mark.parametrize("seed", range(4))
def test_ranking_on_integer_keys_matches_numpy_on_ties_and_signed_zeros(seed):
    """The C++ ranks on integer keys (a radix sort for the budgets, packed (score, index) keys for the
    top-C): many exact ties, -0.0 beside +0.0 and -inf must rank as numpy's float comparisons do."""
    rng = np.random.default_rng(seed)
    L, Hkv, n = 5, 3, 257
    levels = np.array([-np.inf, -1.0, -0.0, 0.0, 0.25, 0.5, 1.0], dtype=np.float32)
    scores = rng.choice(levels, size=(L, Hkv, n)).astype(np.float32)
    for ratio in (0.1, 0.5, 0.9):
        n_total = max(1, int(L * n * (1 - ratio)))
        for agg in ("mean", "max"):
            for lower_bound in (0, 3):
                got = _native.kvcompose_layer_budgets(scores, n_total, agg, lower_bound)
                np.testing.assert_array_equal(got, np_layer_budgets(scores, ratio, agg, lower_bound))
        c = max(1, int(n * (1 - ratio)))
        np.testing.assert_array_equal(_native.select_top(scores, c, [n - 1, 7]), np_select(scores, c, [n - 1, 7]))
