"""KVComposePress(scoring="lookahead"): the prompt scored by the attention of the model's own first answer
tokens, drafted greedily on the full cache and removed before the rewrite (not in the paper)."""

import numpy as np
import pytest

from helpers import greedy, seq_state
from pykvcompose import KVComposePress, Llama
from pykvcompose.probing import decode_at

pytestmark = pytest.mark.model


def test_the_probe_leaves_the_plain_prefill_and_reports_its_drafts(llm, prompt_tokens):
    context = prompt_tokens[:-1]
    llm.kv_compress = None
    probe = llm.kv_probe(context, [KVComposePress(0.5, scoring="lookahead", lookahead=6)])
    assert probe.description == "lookahead of 6"
    assert set(probe.attention) == {("lookahead", 6)}
    probed = seq_state(llm)
    llm.kv_probe(context, [])  # the plain prefill, same batches
    assert probed == seq_state(llm)


def test_the_drafts_are_the_greedy_continuation_and_their_attention_is_captured(llm, prompt_tokens):
    """The lookahead's attention equals the attention of llama-cpp-python's own greedy tokens decoded after the
    context (max and mean over those queries): written one by one with the capture off, then decoded again in
    one captured batch, which ggml computes exactly as any split of it into batches (two here). One-token
    decodes take ggml's matrix-vector kernels, which round differently: close, not equal."""
    context = prompt_tokens[:-1]
    llm.kv_compress = None
    llm.reset()
    drafts = greedy(llm, context, 5)
    probe = llm.kv_probe(context, [KVComposePress(0.5, scoring="lookahead", lookahead=5)])
    engine, n = llm._engine, len(context)
    got = probe.attention[("lookahead", 5)]

    def two_batches():
        decode_at(engine, drafts[:2], n)
        decode_at(engine, drafts[2:], n + 2)

    mx, mean = engine.captured(two_batches, n)
    engine.remove(n)
    np.testing.assert_allclose(got["max"], mx, atol=1e-6)
    np.testing.assert_allclose(got["mean"], mean, atol=1e-6)
    mx1, mean1 = engine.captured(lambda: [engine.decode([t]) for t in drafts], n)
    np.testing.assert_allclose(got["mean"], mean1, atol=0.02)
    assert np.corrcoef(got["mean"].ravel(), mean1.ravel())[0, 1] > 0.99


def test_a_shorter_lookahead_replays_the_longer_ones_drafts(llm, prompt_tokens):
    context = prompt_tokens[:-1]
    both = llm.kv_probe(
        context,
        [KVComposePress(0.5, scoring="lookahead", lookahead=6), KVComposePress(0.5, scoring="lookahead", lookahead=3)],
    )
    alone = llm.kv_probe(context, [KVComposePress(0.5, scoring="lookahead", lookahead=3)])
    for agg in ("max", "mean"):
        np.testing.assert_allclose(
            both.attention[("lookahead", 3)][agg], alone.attention[("lookahead", 3)][agg], atol=1e-6
        )
    assert not np.array_equal(both.attention[("lookahead", 6)]["mean"], both.attention[("lookahead", 3)]["mean"])


def test_the_lookahead_stops_where_the_cache_ends(model_path, prompt_tokens):
    m = Llama(model_path, n_ctx=256, verbose=False)
    try:
        press = KVComposePress(0.5, scoring="lookahead", lookahead=8)
        assert m.kv_probe(prompt_tokens[:255], [press]).description == "lookahead of 1"
        with pytest.raises(RuntimeError, match="no room in the cache to look ahead"):
            m.kv_probe(prompt_tokens[:256], [press])
    finally:
        m.close()


def test_a_prompt_compressed_by_lookahead_continues_like_kv_apply(llm, prompt_tokens):
    """llm(prompt) with the press = kv_probe + kv_apply of the same context: same selection, cell count and probe."""
    press = KVComposePress(0.75, scoring="lookahead", min_tokens=16)
    context = prompt_tokens[:-1]
    llm.kv_compress = None
    stats = llm.kv_apply(press, llm.kv_probe(context, [press]))
    selection = llm.kv_selection.copy()
    llm.kv_compress = press
    llm.reset()
    llm.eval(prompt_tokens)
    assert llm.kv_stats["probe"] == stats["probe"] and stats["probe"].startswith("lookahead of ")
    assert llm.kv_stats["cells_after"] == stats["cells_after"] == press.n_kept(len(context))
    np.testing.assert_array_equal(llm.kv_selection, selection)
    assert llm.kv_history == list(prompt_tokens)


def test_bad_lookahead_is_refused():
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="lookahead"):
            KVComposePress(0.5, scoring="lookahead", lookahead=bad)
    with pytest.raises(ValueError, match="scoring"):
        KVComposePress(0.5, scoring="look-ahead")
