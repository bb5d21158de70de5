"""The streaming policy (model-free): what each kind of press frees and when, the StreamPolicy's own checks,
and which probe stands in for which when a full cache is compressed."""

import dataclasses

import numpy as np
import pytest

from pykvcompose import DecodingPress, KnormPress, KVComposePress, PrefillDecodingPress, SnapKVPress, StreamPolicy
from pykvcompose.probe import Probe, ProbeKind, ProbeSpec
from pykvcompose.streaming import (
    check_cache,
    decoding_due,
    frees_cells,
    phase_press,
    prompt_press,
    question_agnostic,
    room_plan,
    scores_chunks,
)


def test_which_presses_free_cells():
    from pykvcompose import DecodingPress

    assert not frees_cells(SnapKVPress(0.0)) and frees_cells(SnapKVPress(0.5)) and not frees_cells(None)
    assert frees_cells(DecodingPress(SnapKVPress()))
    assert frees_cells(PrefillDecodingPress(SnapKVPress(0.0), DecodingPress(SnapKVPress())))
    assert not frees_cells(PrefillDecodingPress(SnapKVPress(0.0)))


def test_prompt_and_room_presses_by_phase():
    from pykvcompose import DecodingPress

    snap, decoding = KVComposePress(0.5), DecodingPress(SnapKVPress(), target_size=64)
    assert prompt_press(snap) is snap and prompt_press(decoding) is None and prompt_press(None) is None
    both = PrefillDecodingPress(snap, decoding)
    assert prompt_press(both) is snap
    assert phase_press(both, "prefill") is snap and phase_press(both, "decode") is decoding
    lossless = PrefillDecodingPress(KVComposePress(0.0), decoding)
    assert phase_press(lossless, "prefill") is decoding  # the prompt press frees nothing: the other one does
    assert phase_press(PrefillDecodingPress(KVComposePress(0.0)), "decode") is None
    assert phase_press(KVComposePress(0.0), "prefill") is None
    with pytest.raises(ValueError, match="phase"):
        phase_press(both, "later")


def test_room_plans():
    from pykvcompose import DecodingPress

    scorer, keep, window = room_plan(KVComposePress(0.75, window=48), 1000)
    assert (keep, window) == (250, 48) and scorer.compression_ratio == 0.75
    assert room_plan(SnapKVPress(0.5, window_size=16), 100)[1:] == (50, 16)
    assert room_plan(KnormPress(0.5), 100)[1:] == (50, 64)
    scorer, keep, window = room_plan(DecodingPress(SnapKVPress(), target_size=64, hidden_states_buffer_size=8), 256)
    assert (keep, window) == (64, 8) and scorer.compression_ratio == 0.75 and scorer.n_kept(256) == 64


def test_decoding_schedule_and_cache_check():
    from pykvcompose import DecodingPress

    press = DecodingPress(SnapKVPress(), compression_interval=32, target_size=100)
    assert decoding_due(press, "prefill", 40) is None
    assert decoding_due(press, "decode", 10) == 22 and decoding_due(press, "decode", 40) == 0
    assert decoding_due(SnapKVPress(0.5), "decode", 1000) is None
    check_cache(press, 102)
    with pytest.raises(ValueError, match="target_size"):
        check_cache(press, 101)
    with pytest.raises(ValueError, match="target_size"):
        check_cache(PrefillDecodingPress(SnapKVPress(0.5), press), 64)


def test_question_agnostic_and_chunk_scoring_by_press():
    assert question_agnostic(KVComposePress(0.25)) == KVComposePress(0.25, scoring="reconstruct")
    assert question_agnostic(KVComposePress(0.75)) == KVComposePress(0.75, scoring="reconstruct", self_information=True)
    assert question_agnostic(KVComposePress(0.5, scoring="window")) == KVComposePress(0.5, scoring="window")
    assert question_agnostic(SnapKVPress(0.5)) == SnapKVPress(0.5)
    assert scores_chunks(KVComposePress(0.5)) and scores_chunks(KVComposePress(0.5, scoring="reconstruct"))
    assert not scores_chunks(KVComposePress(0.5, scoring="window")) and not scores_chunks(SnapKVPress(0.5))
    assert not scores_chunks(KnormPress(0.5)) and not scores_chunks(DecodingPress(KVComposePress(0.5)))


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"room": "evict"}, "kv_room"),
        ({"chunk": 0}, "kv_chunk"),
        ({"question_tail": -1}, "question_tail"),
        ({"question_tail": 513}, "question_tail"),
        ({"question_drafts": 0}, "question_drafts"),
        ({"question_consensus": 1.5}, "question_consensus"),
        ({"question_every": 0}, "question_every"),
    ],
)
def test_bad_stream_policies_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        StreamPolicy(**fields)


def test_the_chunk_fits_twice_into_the_cache():
    assert StreamPolicy().chunk_for(1024, 512) == 128 and StreamPolicy().chunk_for(8192, 512) == 256
    assert StreamPolicy(chunk=100).chunk_for(1024, 512) == 100
    with pytest.raises(ValueError, match="kv_chunk"):
        StreamPolicy(chunk=512).chunk_for(1024, 512)
    assert dataclasses.replace(StreamPolicy(), room="ratio").room == "ratio"


def test_a_stand_in_probe_is_explicit_and_never_carried_as_a_measurement():
    """A press is answered by another probe only when the caller says so; the stand-in is named in the probe,
    and a reconstruct entry that only stands in is not mistaken for a measured one."""
    probe = Probe(2, 4, 2, 5)
    with pytest.raises(ValueError, match="was not run"):
        probe.head_scores(("reconstruct", 0), "max")
    recent = ProbeSpec(ProbeKind.RECENT, 3)
    probe.attention[recent] = {"max": np.ones((2, 4, 5), np.float32), "mean": np.zeros((2, 4, 5), np.float32)}
    probe.stand_in(KVComposePress(scoring="reconstruct").probe(), recent)
    assert probe.head_scores(("reconstruct", 0), "max").sum() == 40
    assert probe.stand_ins == {ProbeSpec(ProbeKind.RECONSTRUCT): recent}
    assert probe.measured(ProbeKind.RECONSTRUCT) is None and probe.measured(ProbeKind.RECENT)[0] == recent
    with pytest.raises(ValueError, match="unknown probe"):
        ProbeSpec.of(("magic", 1))
