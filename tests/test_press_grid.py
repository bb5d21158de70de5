"""Every press through the same llama.cpp path: cell count, kept set = top-C of its own scores,
ratio 0 lossless, token-level mode = llama.cpp's own eviction, one probe shared by many presses."""

import llama_cpp
import numpy as np
import pytest

from helpers import last_logits, logits_after, press_list
from helpers import press_ids as ids
from oracles import np_consensus, np_pyramid_budgets, np_select
from pykvcompose import _native
from pykvcompose.presses import KVComposePress, PyramidKVPress, SnapKVPress

pytestmark = pytest.mark.model

GRID = press_list(0.6) + press_list(0.6, per_head=False)


def compress(llm, press, tokens):
    llm.kv_compress = press
    llm.reset()
    return logits_after(llm, tokens)


@pytest.mark.parametrize("press", GRID, ids=ids(GRID))
def test_press_keeps_top_c_of_its_scores(llm, prompt_tokens, press):
    compress(llm, press, prompt_tokens)
    n = len(prompt_tokens) - 1
    c = press.n_kept(n)
    stats, sel, scores = llm.kv_stats, llm.kv_selection, llm.kv_scores
    assert stats["cells_after"] == c and stats["cells_before"] == n
    assert stats["kv_bytes_after"] * n == stats["kv_bytes_before"] * c
    assert scores.shape == (llm.kv_n_layer, llm.kv_n_head_kv, n) and sel.shape == scores.shape[:2] + (c,)
    ranked = scores if press.per_head else np_consensus(scores, 1.0)
    np.testing.assert_array_equal(sel, np_select(ranked, c, [n - 1]))
    if isinstance(press, PyramidKVPress):  # what PyramidKV adds to SnapKV: its pyramid, reported
        assert (
            stats["layer_budgets"]
            == np_pyramid_budgets(llm.kv_n_layer, n, press.compression_ratio, press.window_size, press.beta).tolist()
        )
    elif not isinstance(press, KVComposePress):
        assert stats["layer_budgets"] is None
    info = _native.context_state_info(llm._ctx.ctx)
    assert info["n_cells"] == c + 1 and info["pos_max"] == n  # + the held-back last prompt token, at position n
    if press.per_head:
        # composite cells: cell i sits at the largest position among the tokens it holds
        np.testing.assert_array_equal(info["positions"][:-1], sel.max(axis=(0, 1)))
    else:
        assert (sel == sel[0, 0]).all()
        # llama.cpp's own eviction: the kept cells keep their positions (the new token fills a hole)
        np.testing.assert_array_equal(np.sort(info["positions"])[:-1], sel[0, 0])


@pytest.mark.parametrize(
    "press",
    press_list(0.0) + press_list(0.0, per_head=False),
    ids=ids(press_list(0.0) + press_list(0.0, per_head=False)),
)
def test_ratio_zero_is_lossless(llm, plain_llm, prompt_tokens, press):
    """Stock llama-cpp-python fed the prompt in the same calls as the press's prefill (the context up to
    its probe window, the window, the last token): llama.cpp's logits depend on the batch split."""
    n = len(prompt_tokens) - 1
    cut = n - min(press.probe()[1], n) if press.probe() and press.probe()[0] == "window" else n
    plain_llm.reset()
    plain_llm.eval(prompt_tokens[:cut])
    plain_llm.eval(prompt_tokens[cut:n])
    plain_llm.eval(prompt_tokens[-1:])
    np.testing.assert_array_equal(compress(llm, press, prompt_tokens), last_logits(plain_llm))
    assert llm.kv_stats["cells_after"] == len(prompt_tokens) - 1


def test_token_level_equals_llama_eviction_logits(llm, plain_llm, prompt_tokens):
    """Token-level mode is llama.cpp's own llama_memory_seq_rm: same logits as doing it by hand."""
    press = SnapKVPress(compression_ratio=0.5, window_size=32, per_head=False)
    ours = compress(llm, press, prompt_tokens)
    keep = set(llm.kv_selection[0, 0].tolist())
    n = len(prompt_tokens) - 1
    plain_llm.reset()
    plain_llm.eval(prompt_tokens[:-1])
    mem = llama_cpp.llama_get_memory(plain_llm._ctx.ctx)
    for p in range(n):
        if p not in keep:
            assert llama_cpp.llama_memory_seq_rm(mem, 0, p, p + 1)
    plain_llm.eval(prompt_tokens[-1:])
    np.testing.assert_array_equal(ours, last_logits(plain_llm))


def test_one_probe_serves_many_presses(llm, prompt_tokens):
    """kv_probe runs every probe once (windows of 32 and 1 share one prefill, the reconstruct pass
    follows); each press applied to the restored cache keeps what it keeps when run alone."""
    presses = press_list(0.5)
    context = prompt_tokens[:-1]
    llm.kv_compress = None
    probe = llm.kv_probe(context, presses)
    assert set(probe.attention) == {("window", 32), ("window", 1), ("lookahead", 32), ("reconstruct", 0)}
    state = llm.save_state()
    shared = []
    for press in presses:
        llm.load_state(state)
        llm.kv_apply(press, probe)
        shared.append(llm.kv_selection.copy())
    for press, sel in zip(presses, shared):
        compress(llm, press, prompt_tokens)
        alone = llm.kv_selection
        # the shared prefill cuts the window into more ubatches: allow the rounding that moves
        overlap = np.mean(
            [
                len(np.intersect1d(a, b)) / len(a)
                for a, b in zip(alone.reshape(-1, alone.shape[-1]), sel.reshape(-1, sel.shape[-1]))
            ]
        )
        # a lookahead's drafts follow the logits of the prefill's last ubatch, which the shared prefill cuts
        # differently: its greedy drafts, and so its queries, may part ways (0.90 measured)
        assert overlap > (0.85 if (press.probe() or ("",))[0] == "lookahead" else 0.98), (type(press).__name__, overlap)


def test_compress_context_then_ask_continues_on_the_compressed_cache(llm, prompt_tokens):
    """Question-agnostic use: compress the context alone, then a prompt that extends it is decoded on
    the compressed cells (no second prefill) and answers from them."""
    context, question = prompt_tokens[:-20], prompt_tokens[-20:]
    llm.kv_compress = SnapKVPress(compression_ratio=0.5, window_size=32)
    llm.reset()
    stats = dict(llm.compress_context(context))
    assert stats["context_tokens"] == len(context) and stats["cells_after"] == len(context) // 2
    gen = llm.generate(context + question, temp=0.0)
    next(gen)
    gen.close()
    assert llm.kv_stats == stats  # not compressed again
    info = _native.context_state_info(llm._ctx.ctx)
    assert info["n_cells"] == len(context) // 2 + len(question) and info["pos_max"] == len(context) + 19


def test_compress_context_errors(llm, prompt_tokens):
    llm.kv_compress = None
    with pytest.raises(ValueError, match="no press"):
        llm.compress_context(prompt_tokens)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        llm.compress_context(prompt_tokens[:1], SnapKVPress(0.5))
    with pytest.raises(ValueError, match="exceed context window of 2048: SnapKVPress with compression_ratio 0.0"):
        llm.compress_context(prompt_tokens * 6, SnapKVPress(0.0))  # longer than the cache, and nothing to free


def test_kv_probe_rejects_an_unknown_probe(llm, prompt_tokens):
    class Odd(SnapKVPress):
        def probe(self):
            return ("glimpse", 3)

    with pytest.raises(ValueError, match="unknown probe"):
        llm.kv_probe(prompt_tokens[:50], [Odd(0.5)])
