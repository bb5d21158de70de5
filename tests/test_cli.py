"""``pykvcompose run`` and ``chat``: the commands a user types, run as subprocesses."""

import subprocess
import sys

import pytest

from kvbench.haystack import paragraphs
from pykvcompose import commands
from pykvcompose.presses import DecodingPress, KVComposePress, PrefillDecodingPress, SnapKVPress


def pkv(*args, stdin=None, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "pykvcompose", *args], input=stdin, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def document(tmp_path_factory):
    """About 1.7k tokens: more than three caches of 512 cells."""
    path = tmp_path_factory.mktemp("doc") / "doc.txt"
    path.write_text(" ".join(paragraphs()[100:140]) + "\n\nThe secret code of the vault is 48213.\n")
    return path


@pytest.mark.model  # (a subprocess loads the model)
def test_run_answers_about_a_document_longer_than_the_cache(document):
    r = pkv(
        "run",
        "--file",
        str(document),
        "--question",
        "What is the secret code of the vault?",
        "--n-ctx",
        "512",
        "--kv-compress",
        "snapkv:0.5",
        "--max-tokens",
        "12",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    assert "prompt tokens prefilled" in r.stderr  # the progress bar
    assert "cells for" in r.stderr and "compressions to make room" in r.stderr
    compressions = int(r.stderr.rsplit("), ", 1)[1].split()[0])
    assert compressions >= 2


@pytest.mark.model  # (a subprocess loads the model)
def test_run_quiet_prints_only_the_answer(document):
    args = ["run", "--file", str(document), "--question", "Which code?", "--n-ctx", "512"]
    args += ["--kv-compress", "snapkv:0.5", "--max-tokens", "6"]
    loud = pkv(*args)
    quiet = pkv(*args, "--quiet")
    assert quiet.returncode == 0 and quiet.stderr == ""
    assert quiet.stdout == loud.stdout  # greedy: the same answer


@pytest.mark.parametrize(
    "args,message",
    [
        (["--kv-compress", "fastkv:0.5"], "unknown press 'fastkv'"),
        (["--kv-compress", "snapkv:0.5,window=3"], "snapkv has no field 'window'"),
        (["--kv-compress", "snapkv:1.5"], "compression_ratio must be a number in [0, 1)"),
        (["--kv-compress", "snapkv"], "needs a compression ratio"),
        (["--kv-compress", "none", "--n-ctx", "256"], "exceed context window of 256"),
        (["--model", "/nonexistent.gguf"], "no such file"),
        (["--decode-target", "4096", "--n-ctx", "512"], "target_size (4096) must be below n_ctx - 1"),
        (["--n-ctx", "8"], "--n-ctx must be at least 16"),
        (["--threads", "0"], "--threads must be at least 1"),
        (["--max-tokens", "0"], "--max-tokens must be at least 1"),
        (["--temperature", "-1"], "--temperature must be >= 0"),
        (["--decode-target", "100", "--decode-interval", "0"], "compression_interval must be an integer >= 1"),
    ],
)
def test_run_errors_are_one_line_and_exit_2(document, args, message):
    r = pkv("run", "--file", str(document), "--question", "Q?", "--quiet", *args)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr


def test_run_missing_file(tmp_path):
    r = pkv("run", "--file", str(tmp_path / "nope.txt"), "--question", "Q?")
    assert r.returncode == 2 and "cannot read --file" in r.stderr


@pytest.mark.model  # (a subprocess loads the model)
def test_chat_session_is_continued(tmp_path):
    session = tmp_path / "chat.kvc"
    first = pkv(
        "chat",
        "--n-ctx",
        "512",
        "--kv-compress",
        "snapkv:0.5",
        "--temperature",
        "0",
        "--max-tokens",
        "8",
        "--session",
        str(session),
        stdin="My name is Ada and I like tea.\n/stats\n/quit\n",
    )
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip()
    assert "cells for" in first.stderr and "conversation saved" in first.stderr
    second = pkv(
        "chat",
        "--n-ctx",
        "512",
        "--kv-compress",
        "snapkv:0.5",
        "--temperature",
        "0",
        "--max-tokens",
        "8",
        "--session",
        str(session),
        stdin="What is my name?\n",
    )
    assert second.returncode == 0, second.stderr
    assert "continuing" in second.stderr and "2 messages" in second.stderr


def test_chat_commands_and_errors(tmp_path):
    r = pkv("chat", "--n-ctx", "512", "--quiet", stdin=f"/bogus\n/load {tmp_path / 'none.kvc'}\n/save\n/quit\n")
    assert r.returncode == 0
    assert "unknown command /bogus" in r.stderr
    assert "cannot read session file" in r.stderr
    assert "usage: /save PATH" in r.stderr


def test_press_options():
    p = __import__("argparse").ArgumentParser()
    commands.add_model_options(p)
    a = p.parse_args(["--kv-compress", "kvcompose:0.75,scoring=reconstruct"])
    assert commands.press_from_args(a) == KVComposePress(0.75, scoring="reconstruct")
    a = p.parse_args(["--kv-compress", "snapkv:0.5", "--decode-target", "300", "--decode-interval", "64"])
    assert commands.press_from_args(a) == PrefillDecodingPress(
        SnapKVPress(0.5), DecodingPress(SnapKVPress(0.0), compression_interval=64, target_size=300)
    )
    a = p.parse_args(["--kv-compress", "none", "--decode-target", "300"])
    assert commands.press_from_args(a) == DecodingPress(SnapKVPress(), target_size=300, compression_interval=512)
    assert commands.press_from_args(p.parse_args(["--kv-compress", "NONE"])) is None


@pytest.mark.model
@pytest.mark.parametrize("argv,room", [([], "fill"), (["--kv-room", "ratio"], "ratio")])
def test_the_room_option_reaches_the_cache(argv, room):
    """``run`` streams documents longer than the cache: by default a full cache is filled (kv_room="fill")."""
    p = __import__("argparse").ArgumentParser()
    commands.add_model_options(p)
    llm = commands.make_llm(p.parse_args(["--n-ctx", "512", "--quiet", *argv]))
    try:
        assert llm.kv_room == room and llm.kv_chunk == 64
    finally:
        llm.close()
