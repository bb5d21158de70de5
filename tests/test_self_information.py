"""The sentence self-information prior of question-agnostic compression (``KVComposePress.self_information``):
the self-information measured at prefill against stock llama-cpp-python's logits, the sentences, the rank fusion
against a numpy re-implementation, and what ``compress_context`` keeps with it."""

import llama_cpp
import numpy as np
import pytest

from helpers import N_THREADS
from kvbench.haystack import haystack_text
from oracles import np_layer_budgets
from pykvcompose import KVComposePress, Llama
from pykvcompose.engine import surprisal
from pykvcompose.probe import Probe
from pykvcompose.streaming import question_agnostic


def test_surprisal_is_the_negative_log_softmax_of_the_next_token():
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(150, 1000)) * 8).astype(np.float32)
    tokens = rng.integers(0, 1000, size=150)
    x = logits.astype(np.float64)
    expected = np.log(np.exp(x - x.max(1, keepdims=True)).sum(1)) + x.max(1) - x[np.arange(150), tokens]
    np.testing.assert_allclose(surprisal(logits, list(tokens), rows=64), expected, rtol=1e-5, atol=1e-4)


def test_sentence_information_is_the_most_of_any_token_in_the_sentence():
    probe = Probe(1, 1, 1, 7)
    with pytest.raises(ValueError, match="self-information"):
        probe.sentence_information()
    probe.self_information = np.array([0.0, 1.0, 5.0, 2.0, 0.5, 3.0, 1.0], dtype=np.float32)
    probe.sentences = np.array([0, 0, 0, 1, 1, 2, 2], dtype=np.int32)
    assert probe.sentence_information().tolist() == [5, 5, 5, 2, 2, 3, 3]


def test_the_fusion_adds_the_ranks_of_the_published_score_and_of_the_sentence_information_after_sinks_recent_budgets(
    monkeypatch,
):
    rng = np.random.default_rng(1)
    n = 200  # 50 kept cells at 0.75: the newest round(0.12 * 50) = 6 tokens are kept in every head
    probe = Probe(2, 6, 2, n)
    probe.self_information = rng.exponential(size=n).astype(np.float32)
    probe.sentences = np.repeat(np.arange(40), 5).astype(np.int32)
    published = rng.random((2, 2, n)).astype(np.float32)
    published[1] **= 4  # layer 1 peaked: its paper budget is below the cells, layer 0's above
    monkeypatch.setattr("pykvcompose._native.kvcompose_score", lambda *args: published)
    press = KVComposePress(0.75, scoring="reconstruct", self_information=True)
    monkeypatch.setattr(KVComposePress, "head_scores", lambda self, probe: None)

    def rank(x):  # the position of each value in its row's ascending order, ties by position
        out = np.empty_like(x, dtype=np.float64)
        for idx in np.ndindex(x.shape[:-1]):
            row = x[idx]
            order = sorted(range(len(row)), key=lambda i: (row[i], i))
            out[idx][order] = np.arange(len(row)) / (len(row) - 1)
        return out

    sentence_max = np.array([probe.self_information[probe.sentences == s].max() for s in probe.sentences])
    expected = rank(published) + rank(np.broadcast_to(sentence_max, published.shape))
    # where a layer's paper budget fits the 50 cells, each head's top budget by the published score comes next
    budgets = np_layer_budgets(published, 0.75, "mean", 0)[:, None, None]
    assert budgets.min() < 50 < budgets.max()  # one layer fits, one does not: both branches are exercised
    expected += 4.0 * ((rank(published) >= 1 - budgets / n) & (budgets <= 50))
    expected[..., :4] += 8.0  # the four attention sinks rank above every other token in every head
    expected[..., n - 6 :] += 8.0  # and so do the newest 12% of the kept cells' worth of tokens
    np.testing.assert_allclose(press.score(probe), expected, atol=1e-6)
    # even where both ranks put the first and the last tokens last, each head keeps them among its cells
    published[..., :4] = 0.0
    published[..., n - 6 :] = 0.0
    probe.self_information[:5] = 0.0  # the first sentence, the least surprising
    probe.self_information[n - 5 :] = 0.0  # and the last
    kept = press.select(press.score(probe), press.n_kept(n))
    wanted = set(range(4)) | set(range(n - 6, n))
    assert all(wanted <= set(kept[idx].tolist()) for idx in np.ndindex(kept.shape[:-1]))
    # and the layer that fits keeps each head's top budget by the published score, whatever the prior says
    budgets = np_layer_budgets(published, 0.75, "mean", 0)
    layer, b = int(np.argmin(budgets)), int(budgets.min())
    assert b + 4 + 6 <= 50  # room for it beside the sinks and the newest tokens
    for head in range(2):
        top = np.argsort(-published[layer, head], kind="stable")[:b]
        assert set(top.tolist()) <= set(kept[layer, head].tolist())
    assert not KVComposePress(0.75, scoring="reconstruct").reads_self_information()
    probe.self_information = None  # not measured (a compression that makes room): the published score
    np.testing.assert_array_equal(press.score(probe), published)
    np.testing.assert_array_equal(KVComposePress(0.75, scoring="reconstruct").score(probe), published)


def test_compress_context_adds_the_prior_to_the_default_press_and_keeps_the_published_one_a_field_away():
    auto = question_agnostic(KVComposePress(0.75))
    assert (auto.scoring, auto.self_information) == ("reconstruct", True) and auto.reads_self_information()
    # from 0.5 on the prior found more facts than the probe alone; below, nothing was measured: the published probe
    for ratio, prior in ((0.25, False), (0.45, False), (0.5, True), (0.75, True), (0.875, True)):
        assert question_agnostic(KVComposePress(ratio)).self_information is prior, ratio
    assert question_agnostic(KVComposePress(0.25, self_information=True)).self_information
    prior = question_agnostic(KVComposePress(0.75, self_information=True))
    assert (prior.scoring, prior.self_information) == ("reconstruct", True) and prior.reads_self_information()
    published = KVComposePress(0.75, scoring="reconstruct")
    assert question_agnostic(published) is published and not published.self_information
    with pytest.raises(ValueError, match="self_information"):
        KVComposePress(0.75, self_information="yes")


@pytest.mark.model
def test_the_prefill_measures_each_tokens_self_information_as_stock_llama_cpp_logits_give_it(model_path, prompt_tokens):
    tokens = prompt_tokens[:300]
    ref = llama_cpp.Llama(model_path, n_ctx=512, n_batch=512, logits_all=True, n_threads=N_THREADS, verbose=False)
    try:
        ref.eval(tokens)
        x = np.array(ref.scores[: len(tokens) - 1], dtype=np.float64)
    finally:
        ref.close()
    peak = x.max(1)
    expected = np.log(np.exp(x - peak[:, None]).sum(1)) + peak - x[np.arange(len(tokens) - 1), tokens[1:]]
    # a measuring prefill decodes 128 rows at a time (llama.cpp holds rows x vocabulary floats of logits),
    # and the first token of each batch is predicted by the previous batch's last row
    llm = Llama(model_path, n_ctx=1024, n_batch=512, verbose=False)
    sizes = []
    real_decode = llm._engine.decode
    llm._engine.decode = lambda batch, all_logits=False: (
        sizes.append((len(batch), all_logits)) or real_decode(batch, all_logits)
    )
    try:
        probe = llm.kv_probe(tokens, [KVComposePress(0.5, scoring="reconstruct", self_information=True)])
        measured, sizes[:] = list(sizes), []
        plain = llm.kv_probe(tokens, [KVComposePress(0.5, scoring="reconstruct")])
        texts = [llm.detokenize([t], special=True) for t in tokens]
    finally:
        llm.close()
    assert measured == [(128, True), (128, True), (44, True)] and sizes == [(300, False)]
    assert probe.self_information[0] == 0.0
    np.testing.assert_allclose(probe.self_information[1:], expected, atol=2e-3)
    assert "self-information" in probe.description
    assert plain.self_information is None and "self-information" not in plain.description
    # sentences: a new one after every token whose text holds . ! ? or a line break (not a colon)
    starts = [i for i in range(1, len(tokens)) if any(c in texts[i - 1] for c in b".!?\n")]
    assert len(starts) > 5
    assert np.flatnonzero(np.diff(probe.sentences)).tolist() == [i - 1 for i in starts]
    assert probe.sentences[0] == 0 and (np.diff(probe.sentences) >= 0).all()


@pytest.mark.model
@pytest.mark.parametrize("label", ["The code for the vault is", "The code for the vault is:"])
def test_a_number_the_text_could_not_predict_is_kept_in_more_heads_with_the_prior(model_path, label):
    """Documentation with one sentence holding a random number: the published reconstruct probe has to
    copy every token, and keeps the whole number in few heads; the sentence prior in far more. After a
    colon too: the number stays in its label's sentence (alone, its digits carry little self-information)."""
    doc = haystack_text()[30000:33000]
    cut = doc.index(". ", 1500) + 2
    text = doc[:cut] + label + " 5820417. " + doc[cut:]
    llm = Llama(model_path, n_ctx=2048, verbose=False)
    try:
        tokens = llm.tokenize(text.encode())
        digits = [i for i, t in enumerate(tokens) if llm.detokenize([t]).strip().isdigit()]
        assert len(digits) >= 4
        presses = [KVComposePress(0.75, scoring="reconstruct", self_information=s) for s in (False, True)]
        probe = llm.kv_probe(tokens, presses)
    finally:
        llm.close()
    kept = []
    for press in presses:
        selection = press.select(press.score(probe), press.n_kept(len(tokens)))
        kept.append(np.isin(selection, digits).sum(axis=-1))  # (layers, kv_heads): digits kept
    published, prior = kept
    whole = (prior == len(digits)).mean(), (published == len(digits)).mean()
    # measured: the whole number in 43% of the heads against 13%, 4.7 of its 7 digits per head against 2.4
    assert whole[0] > 2 * whole[1] + 0.1, (prior, published)
    assert prior.mean() > 1.5 * published.mean(), (prior, published)


@pytest.mark.model
def test_compress_context_with_the_default_press_keeps_what_the_prior_ranks_first(model_path, prompt_tokens):
    """``compress_context`` with ``KVComposePress(0.75)``: the prior measured in its prefill, every head
    keeping the sinks and the newest 12% of its cells' worth of tokens, the same cells as the explicit
    prior press on ``kv_probe``; ``scoring="reconstruct"`` keeps the published selection."""
    context = prompt_tokens[:400]
    n = len(context)
    llm = Llama(model_path, n_ctx=1024, n_threads=N_THREADS, verbose=False)
    try:
        stats = dict(llm.compress_context(context, KVComposePress(0.75)))
        default = llm.kv_selection.copy()
        published_stats = dict(llm.compress_context(context, KVComposePress(0.75, scoring="reconstruct")))
        published = llm.kv_selection.copy()
        # one probe per press: the prior's prefill asks for every row's logits, which llama.cpp computes in
        # smaller batches, so the published press is probed alone, as compress_context probed it
        presses = [KVComposePress(0.75, scoring="reconstruct", self_information=s) for s in (True, False)]
        probes = [llm.kv_probe(context, [press]) for press in presses]
    finally:
        llm.close()
    assert "self-information" in stats["probe"] and "self-information" not in published_stats["probe"]
    # (every compression keeps the newest cell in every head)
    prior, plain = (p.select(p.score(probe), p.n_kept(n), forced=[n - 1]) for p, probe in zip(presses, probes))
    np.testing.assert_array_equal(default, prior)
    np.testing.assert_array_equal(published, plain)
    recent = round(0.12 * n * 0.25)  # 12 of 100 cells
    wanted = set(range(4)) | set(range(n - recent, n))
    assert all(wanted <= set(default[idx].tolist()) for idx in np.ndindex(default.shape[:-1]))
    assert not all(wanted <= set(published[idx].tolist()) for idx in np.ndindex(published.shape[:-1]))
    # and where a layer's paper budget leaves room beside them, every head keeps its own top budget by the probe
    scores = presses[1].score(probes[0])
    budgets = presses[1].layer_budgets(scores)
    roomy = [layer for layer, b in enumerate(budgets) if b <= 100 - len(wanted)]
    assert roomy and len(roomy) < len(budgets)
    for layer in roomy:
        for head in range(scores.shape[1]):
            top = np.argsort(-scores[layer, head], kind="stable")[: budgets[layer]]
            assert set(top.tolist()) <= set(default[layer, head].tolist()), (layer, head)
