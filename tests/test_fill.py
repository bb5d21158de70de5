"""kv_room="fill": documents longer than the cache keep it full, and reconstruct-probe presses score each
chunk once and carry those scores through every rewrite (and into session files)."""

import contextlib
import dataclasses
import struct

import numpy as np
import pytest

from helpers import greedy, press_ids, press_list, seq_state
from kvbench.haystack import haystack_text, passkey_cases, passkey_positions, share_kept
from pykvcompose import KVComposePress, Llama, SnapKVPress, probing, rewrite, session, streaming
from pykvcompose.compression import gather_heads

pytestmark = pytest.mark.model

N_CTX, CHUNK = 256, 32


@pytest.fixture(scope="module")
def long_tokens(plain_llm):
    toks = plain_llm.tokenize(haystack_text()[40000:43500].encode())
    assert len(toks) > 700
    return toks[:700]


@pytest.fixture(scope="module")
def filler(model_path):
    m = Llama(model_path, n_ctx=N_CTX, n_batch=128, verbose=False, kv_room="fill", kv_chunk=CHUNK)
    yield m
    m.close()


@contextlib.contextmanager
def streaming_with(llm, **fields):
    """``llm.kv_stream`` with ``fields`` changed inside the block, and as it was after it (the module's models
    are shared: a failed test must not leave its policy to the next ones)."""
    policy = llm.kv_stream
    llm.kv_stream = dataclasses.replace(policy, **fields)
    try:
        yield
    finally:
        llm.kv_stream = policy


def test_fill_is_the_default_and_a_chunk_is_an_eighth_of_the_cache(model_path):
    m = Llama(model_path, n_ctx=N_CTX, verbose=False)
    try:
        assert m.kv_room == "fill" and m.kv_chunk == N_CTX // 8  # a full cache keeps 3/4 of its cells
    finally:
        m.close()


def test_bad_room_options_are_refused(model_path):
    with pytest.raises(ValueError, match="kv_room"):
        Llama(model_path, n_ctx=N_CTX, verbose=False, kv_room="half")
    with pytest.raises(ValueError, match="kv_chunk"):
        Llama(model_path, n_ctx=N_CTX, verbose=False, kv_chunk=0)
    with pytest.raises(ValueError, match="kv_chunk"):
        Llama(model_path, n_ctx=N_CTX, verbose=False, kv_chunk=N_CTX // 2)


def test_a_rescoring_press_frees_only_one_chunk(filler, long_tokens):
    filler.kv_compress = SnapKVPress(0.5)
    filler.reset()
    filler.eval(long_tokens)
    assert filler.kv_stats["trigger"] == "cache full"
    assert filler.kv_stats["cells_after"] == N_CTX - CHUNK  # the ratio would have kept N_CTX // 2
    assert N_CTX - CHUNK <= filler.kv_cells <= N_CTX
    assert filler.kv_history == long_tokens


def test_each_chunk_is_scored_by_a_reconstruct_probe_of_it(filler, long_tokens, monkeypatch):
    """The first chunk's persisted scores, written while a prompt longer than the cache streams in, are
    exactly what kv_probe's reconstruct probe gives the same tokens (the chunk decoded again after
    itself, same batches)."""
    filler.kv_compress = KVComposePress(0.5, min_tokens=16)
    filler.reset()
    first = []
    real = streaming.score_cells

    def recording(engine):
        done = real(engine)
        if done and not first:
            first.append({agg: a.copy() for agg, a in engine.conv.cell_scores.items()})
        return done

    monkeypatch.setattr(streaming, "score_cells", recording)
    filler.eval(long_tokens)
    monkeypatch.setattr(streaming, "score_cells", real)
    scores = first[0]["max"]
    assert scores.shape == (filler.kv_n_layer, filler.kv_n_head, CHUNK)
    published = KVComposePress(0.5, min_tokens=16, scoring="reconstruct")  # the default's prompt probe is a lookahead
    reference = filler.kv_probe(long_tokens[:CHUNK], [published]).attention[("reconstruct", 0)]["max"]
    np.testing.assert_array_equal(scores, reference)


def test_a_prompt_that_fits_is_not_probed_chunk_by_chunk(filler, long_tokens, monkeypatch):
    """A prompt that fits is compressed whole by its own probe (or not at all) once it is in: probing its
    chunks on the way would cost a second prefill for nothing. The same tokens streamed as part of a
    longer prompt are."""
    probes = []
    real = streaming.score_cells
    monkeypatch.setattr(streaming, "score_cells", lambda engine: probes.append(engine.conv.cells) or real(engine))
    filler.kv_compress = KVComposePress(0.5, min_tokens=10_000)  # never compressed whole: what streaming did stays
    filler.reset()
    filler.eval(long_tokens[: 2 * CHUNK + 8])
    assert probes == [] and filler.kv_cell_scores is None
    filler.reset()
    filler.eval(long_tokens)
    assert filler.kv_compressions >= 1 and probes[0] == CHUNK  # the first chunk, probed once it was in


def test_scores_persist_through_every_rewrite(filler, long_tokens, monkeypatch):
    """At every compression of a full cache the kept cells keep the score they had: the score of the
    token a cell holds in a head is the score that token got when its chunk was probed."""
    filler.kv_compress = KVComposePress(0.5, min_tokens=16)
    filler.reset()
    engine = filler._engine
    real = streaming.make_room
    checked = []

    def checking(engine_, press, trigger):
        conv = engine_.conv
        assert conv.scored_cells == conv.cells  # every cell was probed before the cache is ranked
        positions = rewrite.cell_positions(engine_, conv.cells)
        before = {agg: a.copy() for agg, a in conv.cell_scores.items()}
        real(engine_, press, trigger)
        origin = conv.origin  # (layers, kv_heads, kept): the positions the new cells hold
        index = np.stack(
            [
                [np.searchsorted(positions[l, g], origin[l, g]) for g in range(origin.shape[1])]
                for l in range(origin.shape[0])
            ]
        ).astype(np.int32)
        assert (np.take_along_axis(positions, index, -1) == origin).all()
        for agg in ("max", "mean"):
            np.testing.assert_array_equal(conv.cell_scores[agg], gather_heads(before[agg], index))
        checked.append(conv.cells)

    monkeypatch.setattr(streaming, "make_room", checking)
    filler.eval(long_tokens)
    assert len(checked) >= 5 and set(checked) == {N_CTX - 2 * CHUNK}  # room for a chunk and its probe
    assert engine.conv.cells <= N_CTX - CHUNK
    assert filler.kv_stats["probe"] == "each chunk's reconstruct probe, persisted"


@pytest.mark.parametrize(
    "press",
    press_list(0.5) + press_list(0.5, per_head=False),
    ids=press_ids(press_list(0.5) + press_list(0.5, per_head=False)),
)
def test_every_press_streams_and_answers_in_fill_mode(filler, long_tokens, press):
    filler.kv_compress = press
    filler.reset()
    out = greedy(filler, long_tokens[:450], 40)  # a long prompt, then a generation that fills the cache again
    assert len(out) == 40 and filler.kv_cells <= N_CTX and filler.kv_compressions >= 3
    assert filler.kv_history[:450] == long_tokens[:450]


def test_a_session_keeps_the_scores_and_an_old_file_is_rescored(filler, model_path, long_tokens, tmp_path):
    filler.kv_compress = KVComposePress(0.5, min_tokens=16)
    filler.reset()
    filler.eval(long_tokens[:500])
    scores = filler.kv_cell_scores.copy()
    filler.save_session(tmp_path / "s.kvc")
    loaded = Llama.load_session(
        tmp_path / "s.kvc", model_path=model_path, n_batch=128, verbose=False, kv_room="fill", kv_chunk=CHUNK
    )
    try:
        np.testing.assert_array_equal(loaded.kv_cell_scores, scores)
        # a version 1 file (no score section) loads; its cells are scored again when the cache next fills
        header, state, _ = session.read_all(tmp_path / "s.kvc")
        header = {k: v for k, v in header.items() if k not in ("pykvcompose", "llama_cpp_python")}
        header["cell_scores_shape"] = None
        old = tmp_path / "v1.kvc"
        session.write(old, header, state)
        data = bytearray(old.read_bytes()[: -32 - 8])  # drop the (empty) score section and the checksum
        data[8:12] = struct.pack("<I", 1)
        old.write_bytes(bytes(data) + session.hashlib.sha256(bytes(data)).digest())
        loaded.load_session(old)
        assert loaded.kv_cell_scores is None and loaded.kv_history == long_tokens[:500]
        loaded.eval(long_tokens[500:])
        assert loaded.kv_cell_scores is not None and loaded.kv_cells <= N_CTX
        # scores that do not fit the cache are refused, the instance intact
        bad = tmp_path / "bad.kvc"
        header["cell_scores_shape"] = [2, 1, 1, 1]
        session.write(bad, header, state, b"\0" * 8)
        with pytest.raises(session.SessionError, match="cell scores"):
            loaded.load_session(bad)
        assert loaded.kv_history == long_tokens
    finally:
        loaded.close()


def test_stream_seconds_count_chunks_and_their_probes(filler, long_tokens):
    filler.kv_compress = KVComposePress(0.5, min_tokens=16)
    filler.reset()
    assert filler.kv_stream_seconds == {"prefill": 0.0, "probe": 0.0}
    filler.eval(long_tokens[:300])
    seconds = filler.kv_stream_seconds
    assert seconds["prefill"] > 0 and seconds["probe"] > 0


def test_a_lookahead_press_streams_exactly_like_the_reconstruct_press(filler, long_tokens):
    """scoring="lookahead" scores prompts only: streamed past the cache, it keeps the same persisted chunk
    scores and the same cells as the published probe."""
    runs = {}
    for scoring in ("reconstruct", "lookahead"):
        filler.kv_compress = KVComposePress(0.5, min_tokens=16, scoring=scoring)
        filler.reset()
        filler.eval(long_tokens[:320])
        assert filler.kv_stats["probe"] == "each chunk's reconstruct probe, persisted"
        runs[scoring] = (filler.kv_selection.copy(), filler.kv_cell_scores.copy(), seq_state(filler))
    np.testing.assert_array_equal(runs["lookahead"][0], runs["reconstruct"][0])
    np.testing.assert_array_equal(runs["lookahead"][1], runs["reconstruct"][1])
    assert runs["lookahead"][2] == runs["reconstruct"][2]


def test_a_streamed_prompt_is_ranked_by_its_question(filler):
    """A prompt longer than the cache, with the default press: every compression that makes room ranks the
    cells by the attention of the prompt's last ``question_tail`` tokens and the model's greedy drafts after
    them (decoded after the cache, then removed), while the chunks' persisted reconstruct scores stay with
    the cells. The pass key's tokens stay in more heads than when the persisted scores rank
    (``question_tail=0``): the text after a fact does not attend to it, the question does."""
    tok = lambda s: filler.tokenize(s.encode(), add_bos=False)  # noqa: E731
    ((_, key, prompt),) = passkey_cases(tok, 700, [0.5])
    tokens = filler.tokenize(prompt.encode())
    needle = passkey_positions(tok, tokens, key)
    kept = {}
    for tail in (48, 0):
        filler.kv_compress = KVComposePress(0.5)
        with streaming_with(filler, question_tail=tail):
            filler.reset()
            greedy(filler, tokens, 1)
            assert filler.kv_compressions >= 10 and filler.kv_history[: len(tokens)] == tokens
            # (a cache of 256 cells leaves a chunk's room, 32 cells, for the question and its drafts)
            assert filler.kv_stats["probe"] == (
                "the prompt's last 31 tokens and a lookahead of 1"
                if tail
                else "each chunk's reconstruct probe, persisted"
            )
            if tail:  # the question ranks every round: the chunks' reconstruct probes would rank nothing
                assert filler.kv_cell_scores is None and filler.kv_stream_seconds["probe"] == 0.0
            else:  # persisted scores rank
                assert 0 < filler.kv_cell_scores.shape[-1] <= filler.kv_cells
                assert filler.kv_stream_seconds["probe"] > 0
            kept[tail] = share_kept(filler.kv_selection, needle)
    # measured here: 0.70 of the key's tokens per head with the question (0.52 with each head's own ranking,
    # question_consensus=0), 0.30 by the persisted scores
    assert kept[48].mean() > kept[0].mean() + 0.1, (kept[48].mean(), kept[0].mean())


def test_a_question_round_decodes_at_most_question_drafts_drafts(filler):
    """Each question-ranked round decodes up to ``StreamPolicy.question_drafts`` greedy drafts after the
    question (16 by default: the same pass keys as the press's 32-token lookahead, for less prompt time),
    fewer where the free cells or the press's ``lookahead`` hold fewer."""
    tok = lambda s: filler.tokenize(s.encode(), add_bos=False)  # noqa: E731
    ((_, _, prompt),) = passkey_cases(tok, 700, [0.5])
    tokens = filler.tokenize(prompt.encode())
    # a round leaves a chunk (32 cells) free: with an 8-token question tail, room for 24 drafts
    for fields, lookahead, drafts in (
        ({}, 32, 16),
        ({"question_drafts": 4}, 32, 4),
        ({"question_drafts": 64}, 32, 24),
        ({}, 8, 8),
    ):
        filler.kv_compress = KVComposePress(0.5, lookahead=lookahead)
        with streaming_with(filler, question_tail=8, **fields):
            filler.reset()
            greedy(filler, tokens, 1)
            assert filler.kv_compressions >= 10
            assert filler.kv_stats["probe"] == f"the prompt's last 8 tokens and a lookahead of {drafts}", fields


def test_generation_after_a_compressed_prompt_answers_as_with_ratio(model_path, filler, long_tokens):
    """Chunk probes decode after the cache: one run after the newest token left llama.cpp's logits the
    probe's, so fill mode sampled a different answer ("the pass key." for 41676 in a pass-key case). A
    prompt that fits, compressed whole, then generation: the same tokens as kv_room="ratio"."""
    press = KVComposePress(0.5, min_tokens=16)
    ratio = Llama(model_path, n_ctx=N_CTX, n_batch=128, verbose=False, kv_room="ratio", kv_compress=press)
    try:
        filler.kv_compress = press
        for prompt in (long_tokens[:200], long_tokens[300:460]):
            filler.reset()
            ratio.reset()
            assert greedy(filler, prompt, 3 * CHUNK) == greedy(ratio, prompt, 3 * CHUNK)
            assert filler.kv_stats["cells_after"] == ratio.kv_stats["cells_after"] < len(prompt)
    finally:
        ratio.close()


def test_generated_tokens_are_probed_only_when_the_cache_nears_full(filler, long_tokens, monkeypatch):
    """A chunk probe decodes the chunk again: for generated tokens that costs a prefill per chunk even when
    the answer ends long before the cache is full, so they are probed only when room must be made."""
    probes = []
    real = streaming.score_cells
    monkeypatch.setattr(streaming, "score_cells", lambda engine: probes.append(engine.conv.cells) or real(engine))
    filler.kv_compress = KVComposePress(0.5, min_tokens=10_000)  # the prompt stays as prefilled
    filler.reset()
    greedy(filler, long_tokens[:60], 3 * CHUNK)  # 60 + 96 cells of 256: never full
    assert probes == [] and filler.kv_compressions == 0
    filler.reset()
    out = greedy(filler, long_tokens[:60], N_CTX)  # past n_ctx: probed, ranked, compressed
    assert len(out) == N_CTX and filler.kv_compressions >= 1
    assert probes and filler.kv_cell_scores is not None


def test_a_prompt_after_reset_streams_as_a_prompt(filler, long_tokens, monkeypatch):
    """reset() after an answer starts a new conversation: the next tokens are a prompt again (chunks probed
    as they come in), not more of the answer."""
    filler.kv_compress = KVComposePress(0.5, min_tokens=10_000)
    filler.reset()
    greedy(filler, long_tokens[:60], 4)
    probes = []
    real = streaming.score_cells
    monkeypatch.setattr(streaming, "score_cells", lambda engine: probes.append(engine.conv.cells) or real(engine))
    filler.reset()
    filler.eval(long_tokens[:300])
    assert probes[0] == CHUNK


def test_reset_forgets_the_last_prompts_question(filler, long_tokens):
    """A streamed prompt is ranked by its question; after reset() a document eval'd on its own has none,
    so the last prompt's question must not rank it."""
    filler.kv_compress = KVComposePress(0.5, min_tokens=16)
    filler.reset()
    greedy(filler, long_tokens[:400], 2)
    assert filler.kv_stats["probe"].startswith("the prompt's last")
    filler.reset()
    filler.eval(long_tokens[:320])
    assert filler.kv_stats["probe"] == "each chunk's reconstruct probe, persisted"


def test_a_cell_keeps_the_most_attention_its_question_gave_it(filler, monkeypatch):
    """Every round of a streamed prompt asks its question again, of a cache that changed: a cell is ranked by
    the most attention the question ever gave it, carried with the cell through each rewrite (ranked by
    one round's attention alone, a pass key's digits were dropped in more heads each round: "73." for
    73352). The prompt's answer forgets those scores with the question."""
    tok = lambda s: filler.tokenize(s.encode(), add_bos=False)  # noqa: E731
    ((_, _, prompt),) = passkey_cases(tok, 700, [0.3])
    tokens = filler.tokenize(prompt.encode())
    filler.kv_compress = KVComposePress(0.5)
    filler.reset()
    conv = filler._engine.conv
    real_probe, real_room = streaming.question_probe, streaming.make_room
    rounds = []

    def asking(engine, probe, tail, lookahead):
        held = None if conv.question_scores is None else {a: v.copy() for a, v in conv.question_scores.items()}
        asked = real_probe(engine, probe, tail, lookahead)
        rounds.append((held, probe.attention[asked], rewrite.cell_positions(engine, conv.cells)))
        return asked

    def checking(engine, press, trigger):
        real_room(engine, press, trigger)
        _, attention, positions = rounds[-1]
        origin = conv.origin
        index = np.stack(
            [
                [np.searchsorted(positions[l, g], origin[l, g]) for g in range(origin.shape[1])]
                for l in range(origin.shape[0])
            ]
        ).astype(np.int32)
        for agg in ("max", "mean"):
            np.testing.assert_array_equal(conv.question_scores[agg], gather_heads(attention[agg], index))

    monkeypatch.setattr(streaming, "question_probe", asking)
    monkeypatch.setattr(streaming, "make_room", checking)
    with streaming_with(filler, question_every=1):  # (a probe at every round)
        greedy(filler, tokens, 1)
    assert len(rounds) >= 10 and rounds[0][0] is None
    raised = 0
    for held, attention, _ in rounds[1:]:
        n = held["max"].shape[-1]
        for agg in ("max", "mean"):
            assert (attention[agg][..., :n] >= held[agg]).all()  # never below what a cell was given before
        raised += int((attention["max"][..., :n] == held["max"]).mean() > 0.01)
    assert raised == len(rounds) - 1  # (and the earlier rounds' attention is what ranks many cells)
    assert conv.question is None and conv.question_scores is None


def test_the_question_probe_is_one_batch_of_the_question_and_its_greedy_drafts(filler, monkeypatch):
    """Greedy drafts cost a forward pass per token: a streamed prompt's question probe decodes the question and
    the last round's drafts in one captured batch, kept if the model still writes each of them greedily on this
    cache (speculative decoding's check), else written again from the first wrong one with the capture off, one
    token at a time, and decoded again in one captured batch. Every round's drafts are the model's greedy ones
    after the question on that cache, and its attention is exactly what one captured batch of the question and
    those drafts gives (the question's rows pooled apart, then the rewritten drafts' batch, change no float)."""
    tok = lambda s: filler.tokenize(s.encode(), add_bos=False)  # noqa: E731
    ((_, _, prompt),) = passkey_cases(tok, 700, [0.3])
    tokens = filler.tokenize(prompt.encode())
    filler.kv_compress = KVComposePress(0.5)
    filler.reset()
    conv = filler._engine.conv
    real_probe, real_drafts = streaming.question_probe, probing.greedy_drafts
    written, rounds = [], []

    def drafting(engine, base, k):
        assert not engine.capture.active  # (one token at a time: decoded again in one captured batch)
        written.append((base - conv.n_tokens - 16, real_drafts(engine, base, k)))  # (16: the question's rows)
        return written[-1][1]

    def asking(engine, probe, tail, lookahead):
        held, conv.question_scores = conv.question_scores, None  # this round's attention, not the running max
        try:
            asked = real_probe(engine, probe, tail, lookahead)
        finally:
            conv.question_scores = held
        question, drafts, base, cells = (
            list(conv.question)[-asked.size :],
            conv.question_drafts,
            conv.n_tokens,
            conv.cells,
        )
        mx, mean = engine.captured(lambda: probing.decode_removed(engine, question + drafts, base), cells)
        try:
            probing.decode_at(engine, question, base)
            greedy_ones = real_drafts(engine, base + len(question), len(drafts))
        finally:
            engine.remove(base)
        got = probe.attention[asked]
        rounds.append(
            (
                drafts == greedy_ones,
                np.abs(got["max"] - mx[..., :cells]).max(),
                np.abs(got["mean"] - mean[..., :cells]).max(),
            )
        )
        return asked

    monkeypatch.setattr(probing, "greedy_drafts", drafting)
    monkeypatch.setattr(streaming, "question_probe", asking)
    with streaming_with(filler, question_tail=16, question_every=1, question_drafts=12):
        greedy(filler, tokens, 1)
    assert filler.kv_compressions >= 10 and filler.kv_stats["probe"].startswith("the prompt's last 16 tokens")
    assert filler._engine.pos_max() == conv.n_tokens - 1  # no probe cell stayed
    assert len(rounds) == filler.kv_compressions
    assert all(same for same, _, _ in rounds)
    assert max(d for _, d, _ in rounds) == 0 and max(d for _, _, d in rounds) < 1e-6, rounds
    # written at the first round and again only where the check failed; verified otherwise
    assert 2 <= len(written) < len(rounds), (len(written), len(rounds))
    # a failed check keeps the drafts before its first wrong one (verified as a pass's are) and writes only the
    # rest, from the model's own token there: the first round's greedy call starts at its second draft (nothing
    # to keep), some later round's after drafts it kept
    assert written[0][0] == 1
    assert any(first > 1 for first, _ in written[1:]), written


def test_the_question_probe_runs_at_every_other_compression(filler, monkeypatch):
    """``StreamPolicy.question_every=2`` (the default): the question's probe (a forward pass of the question
    and its drafts) runs at every other compression that makes room for a streamed prompt; in between, the
    cells that came in since it last ran are kept in every head, and the others ranked by the most attention
    it gave them, as its next run does; the rooms made are the same as with a probe at every compression."""
    tok = lambda s: filler.tokenize(s.encode(), add_bos=False)  # noqa: E731
    ((_, _, prompt),) = passkey_cases(tok, 700, [0.3])
    tokens = filler.tokenize(prompt.encode())
    conv = filler._engine.conv
    real_probe, real_room = streaming.question_probe, streaming.make_room
    probed, rounds = [], []

    def asking(*args):
        probed.append(conv.compressions)
        return real_probe(*args)

    def recording(engine, press, trigger):
        ranked = None if conv.question_scores is None else conv.question_scores["max"].shape[-1]
        before = None if ranked is None else {agg: v.copy() for agg, v in conv.question_scores.items()}
        positions, cells, n_probed = rewrite.cell_positions(engine, conv.cells), conv.cells, len(probed)
        real_room(engine, press, trigger)
        rounds.append((len(probed) > n_probed, cells, ranked, before, positions, conv.selection.copy()))

    monkeypatch.setattr(streaming, "question_probe", asking)
    monkeypatch.setattr(streaming, "make_room", recording)
    runs = {}
    for every in (1, 2):
        filler.kv_compress = KVComposePress(0.5)
        # (2: the policy as a user gets it)
        with streaming_with(filler, **({"question_every": 1} if every == 1 else {})):
            filler.reset()
            rounds.clear()
            greedy(filler, tokens, 8)
            runs[every] = filler.kv_compressions
            ran = [r[0] for r in rounds]
            assert len(rounds) >= 10 and ran == [i % every == 0 for i in range(len(rounds))], ran
            for did_run, cells, ranked, before, positions, selection in rounds:
                if did_run:
                    continue
                for l in range(selection.shape[0]):
                    for g in range(selection.shape[1]):
                        # every cell the question has not ranked is kept; the others are ranked by what it gave
                        assert set(positions[l, g, ranked:cells]) <= set(selection[l, g])
                kept_old = np.isin(positions[..., :ranked], selection)
                if kept_old.any() and not kept_old.all():
                    score = before["max"].mean(axis=(0, 1))
                    assert score[kept_old[0, 0]].mean() > score[~kept_old[0, 0]].mean()
            assert conv.question is None  # forgotten once the prompt is in
    assert runs[1] == runs[2]  # the same rooms made


def test_a_question_ranked_compression_keeps_the_same_cells_in_every_head(filler, monkeypatch):
    """``question_consensus=1`` (the default): every compression ranked by a streamed prompt's question makes
    every head of every layer keep the same cells, so the pass key's tokens are kept or dropped together
    (each head's own ranking, ``question_consensus=0``, splits them across heads round after round)."""
    tok = lambda s: filler.tokenize(s.encode(), add_bos=False)  # noqa: E731
    ((_, key, prompt),) = passkey_cases(tok, 700, [0.3])
    tokens = filler.tokenize(prompt.encode())
    needle = passkey_positions(tok, tokens, key)
    real_room = streaming.make_room
    selections = []

    def recording(engine, press, trigger):
        real_room(engine, press, trigger)
        selections.append(engine.conv.selection.copy())

    monkeypatch.setattr(streaming, "make_room", recording)
    for consensus in (1.0, 0.0):
        filler.kv_compress = KVComposePress(0.5)
        with streaming_with(filler, question_consensus=consensus):
            filler.reset()
            selections.clear()
            greedy(filler, tokens, 1)
        assert len(selections) >= 10 and filler.kv_stats["probe"].startswith("the prompt's last")
        same = [bool((s == s[:1, :1]).all()) for s in selections]
        if consensus:
            assert all(same)  # every question-ranked round: one set of cells for all heads
            assert (filler.kv_selection == filler.kv_selection[:1, :1]).all()
        else:
            assert not any(same)
            assert share_kept(filler.kv_selection, needle).std() > 0  # the key's tokens in some heads, not others
