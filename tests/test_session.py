"""save_session / load_session: compressed conversations on disk."""

import json
import struct

import llama_cpp
import numpy as np
import pytest

from helpers import greedy, last_logits, press_ids, press_list
from pykvcompose import Llama, session
from pykvcompose.presses import DecodingPress, KVComposePress, PrefillDecodingPress, SnapKVPress, parse_press_spec

N_CTX = 512


@pytest.fixture(scope="module")
def talker(model_path):
    m = Llama(model_path, n_ctx=N_CTX, n_batch=128, verbose=False, kv_compress=SnapKVPress(0.75))
    yield m
    m.close()


@pytest.fixture(scope="module")
def saved(talker, prompt_tokens, tmp_path_factory):
    """A compressed conversation on disk, and what the live instance says next."""
    talker.reset()
    first = greedy(talker, prompt_tokens, 4)
    path = tmp_path_factory.mktemp("s") / "chat.kvc"
    info = talker.save_session(path)
    history = talker.kv_history
    follow = prompt_tokens + first + talker.tokenize(b" And then?", add_bos=False)
    after = greedy(talker, follow, 6)
    return {
        "path": path,
        "info": info,
        "history": history,
        "follow": follow,
        "after": after,
        "logits": last_logits(talker),
        "cells": info["cells"],
    }


@pytest.mark.model
def test_a_loaded_session_continues_exactly(model_path, saved):
    llm = Llama.load_session(saved["path"])
    try:
        assert isinstance(llm.kv_compress, SnapKVPress) and llm.kv_compress.compression_ratio == 0.75
        assert llm.n_ctx() == N_CTX and llm.model_path == model_path
        assert llm.kv_history == saved["history"] and llm.kv_cells == saved["cells"]
        assert greedy(llm, saved["follow"], 6) == saved["after"]
        np.testing.assert_array_equal(last_logits(llm), saved["logits"])
    finally:
        llm.close()


def test_loading_into_an_instance(talker, saved):
    talker.kv_compress = None
    talker.reset()
    assert talker.load_session(saved["path"]) is talker
    assert isinstance(talker.kv_compress, SnapKVPress)  # the session's press
    assert talker.kv_history == saved["history"]
    assert greedy(talker, saved["follow"], 6) == saved["after"]


@pytest.mark.model
def test_file_is_smaller_than_an_uncompressed_state(talker, saved, prompt_tokens):
    plain = Llama(talker.model_path, n_ctx=N_CTX, verbose=False)
    try:
        plain.eval(prompt_tokens)
        full = llama_cpp.llama_state_get_size(plain._ctx.ctx)
    finally:
        plain.close()
    assert saved["info"]["file_bytes"] == saved["path"].stat().st_size
    # 0.75 removes three quarters of the prompt's cells; header and history are small
    assert saved["info"]["file_bytes"] < 0.35 * full


def _rewrite(path, out, edit):
    header, state = session.read(path)
    edit(header)
    for key in ("pykvcompose", "llama_cpp_python"):
        header.pop(key, None)
    session.write(out, header, state)


@pytest.mark.parametrize(
    "damage,match",
    [
        (lambda b: b[:-100], "truncated"),
        (lambda b: b[:20], "truncated"),
        (lambda b: b[:5], "signature"),
        (lambda b: b"GGUF" + b[4:], "signature"),
        (lambda b: b[: len(b) // 2] + bytes([b[len(b) // 2] ^ 1]) + b[len(b) // 2 + 1 :], "checksum"),
        (lambda b: b + b"x", "trailing bytes"),
        (lambda b: b[:8] + struct.pack("<I", 99) + b[12:], "format version 99"),
        (lambda b: b"", "signature"),
    ],
)
def test_damaged_files_raise_and_leave_the_instance_usable(talker, saved, tmp_path, damage, match):
    talker.load_session(saved["path"])
    bad = tmp_path / "bad.kvc"
    bad.write_bytes(damage(saved["path"].read_bytes()))
    with pytest.raises(session.SessionError, match=match):
        talker.load_session(bad)
    assert talker.kv_history == saved["history"]
    assert greedy(talker, saved["follow"], 6) == saved["after"]


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda h: h.update(model_fingerprint="0" * 64, model_description="gemma3 270M"), "another model"),
        (lambda h: h.update(tokens=h["tokens"][:-1]), "inconsistent token history"),
        (lambda h: h.update(tokens=[10**9] * h["n_tokens"]), "inconsistent token history"),
        (lambda h: h.update(compressed_cells=h["compressed_cells"] + 1), "cells up to position"),
        (lambda h: h.update(press={"type": "EvilPress"}), "unknown press"),
        (lambda h: h.update(press={"type": "SnapKVPress", "compression_ratio": 7}), "invalid SnapKVPress"),
    ],
)
def test_valid_files_that_do_not_fit_raise_and_leave_the_instance_usable(talker, saved, tmp_path, edit, match):
    talker.load_session(saved["path"])
    bad = tmp_path / "other.kvc"
    _rewrite(saved["path"], bad, edit)
    with pytest.raises(session.SessionError, match=match):
        talker.load_session(bad)
    assert talker.kv_history == saved["history"]
    assert greedy(talker, saved["follow"], 6) == saved["after"]


def test_a_damaged_state_is_refused_by_the_native_parser(talker, saved, tmp_path):
    header, state = session.read(saved["path"])
    header = {k: v for k, v in header.items() if k not in ("pykvcompose", "llama_cpp_python")}
    bad = tmp_path / "state.kvc"
    session.write(bad, header, state[: len(state) // 2])
    with pytest.raises(session.SessionError, match="damaged cache state"):
        talker.load_session(bad)


@pytest.mark.model
def test_another_cache_type_is_refused(model_path, saved):
    other = Llama(model_path, n_ctx=N_CTX, verbose=False, type_k=llama_cpp.GGML_TYPE_Q8_0)
    try:
        other.eval(other.tokenize(b"Hello there"))
        before = other.kv_history
        with pytest.raises(session.SessionError, match="refused"):
            other.load_session(saved["path"])
        assert other.kv_history == before and other.kv_compress is None
        assert len(greedy(other, before + [11], 2)) == 2
    finally:
        other.close()


def test_class_load_refuses_a_bad_file_before_loading_a_model(tmp_path):
    bad = tmp_path / "nothing.kvc"
    bad.write_bytes(b"PYKVCSES")
    with pytest.raises(session.SessionError, match="truncated|signature"):
        Llama.load_session(bad)
    with pytest.raises(session.SessionError, match="cannot read"):
        Llama.load_session(tmp_path / "missing.kvc")


@pytest.mark.model
def test_a_long_streamed_conversation_round_trips(model_path, tmp_path):
    """Past n_ctx: the history is longer than the cache; the file holds it all."""
    llm = Llama(model_path, n_ctx=256, n_batch=128, verbose=False, kv_compress=SnapKVPress(0.5))
    try:
        text = " ".join(["The quick brown fox jumps over the lazy dog."] * 60)
        tokens = llm.tokenize(text.encode())
        greedy(llm, tokens, 2)
        assert llm.n_tokens > 256
        path = tmp_path / "long.kvc"
        llm.save_session(path)
        follow = llm.kv_history + [11]
        ref = greedy(llm, follow, 4)
        loaded = Llama.load_session(path)
        try:
            assert loaded.n_tokens > 256 and loaded.kv_cells <= 256
            assert greedy(loaded, follow, 4) == ref
        finally:
            loaded.close()
    finally:
        llm.close()


JSON_PRESSES = (
    [None]
    + press_list(0.75)
    + press_list(0.5, per_head=False)
    + [
        KVComposePress(0.75, agg_task="mean", add_v_norm=True, lookahead=8),
        DecodingPress(SnapKVPress(window_size=16), compression_interval=8, target_size=100),
        PrefillDecodingPress(parse_press_spec("tova:0.5"), DecodingPress(SnapKVPress(), target_size=64)),
    ]
)


@pytest.mark.parametrize("press", JSON_PRESSES, ids=press_ids(JSON_PRESSES))
def test_presses_round_trip_through_json(press):
    data = json.loads(json.dumps(session.press_to_dict(press)))
    assert session.press_from_dict(data) == press


def test_a_press_saved_with_retired_fields_loads_as_before():
    """Sessions written before head_consensus, span, protect_tail and starved_layers were removed (no gain) and
    question_tail/question_consensus moved to the StreamPolicy: their defaults load as the same press; a
    removed option that was really set is refused by name, not silently dropped."""
    old = dict(
        session.press_to_dict(KVComposePress(0.75)),
        head_consensus=0.0,
        starved_layers="own",
        span=1,
        protect_tail=0,
        question_tail=0,
        question_consensus=0.0,
    )
    assert session.press_from_dict(old) == KVComposePress(0.75)
    with pytest.raises(session.SessionError, match="span"):
        session.press_from_dict(dict(old, span=3))
