"""The short CI pass of the native fuzzer (`make fuzz` runs 100k inputs per phase)."""

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
CORPUS = ROOT / "fuzz" / "corpus"
sys.path.insert(0, str(ROOT / "fuzz"))

import fuzz_native  # noqa: E402


def test_the_corpus_reaches_every_target():
    targets = {p.read_bytes()[0] % 6 for p in CORPUS.iterdir()}
    assert targets == set(range(6))


def test_every_corpus_input_reaches_its_native_entry_point():
    """An input that a Python-side check refuses never tests native code: every corpus file must reach the
    entry point its target exists for (norms seeds once passed "K"/"V", which the binding refuses)."""
    for path in sorted(CORPUS.iterdir()):
        data = path.read_bytes()
        assert fuzz_native.TARGET_FUNCTIONS[data[0] % 6] in fuzz_native.native_calls(data), path.name


def test_a_wrong_argument_from_the_harness_fails_loudly(monkeypatch):
    monkeypatch.setattr(fuzz_native, "PARTS", ("K", "V"))
    with pytest.raises(ValueError, match="part must be"):
        fuzz_native.test_one_input(fuzz_native.seeds()["norms_f32"])


def test_the_seed_inputs_are_valid_buffers():
    """Seeds must get past the parsers, or mutations of them only ever test the first check."""
    from pykvcompose import _native

    for name, data in fuzz_native.seeds().items():
        if name.startswith("parse_"):
            info = _native.state_parse(data[5:])
            assert info["n_cells"] >= 2, name
    assert _native.state_parse(fuzz_native.seeds()["parse_iswa"][5:])["swa_n_layer"] == 1
    for name, data in fuzz_native.seeds().items():
        if name.startswith("compose_"):  # reach the composed state's property checks
            fuzz_native._fuzz_compose(data[5:], *data[1:5])


def test_corpus_and_mutations_raise_only_documented_errors():
    fuzz_native.run_mutations(3000, [CORPUS], seed=1)


def test_a_wrong_composition_is_a_finding(monkeypatch):
    """The harness is not blind: a compose that returns its input unchanged fails its property check."""
    from pykvcompose import _native

    monkeypatch.setattr(_native, "state_compose", lambda data, selection: data)
    with pytest.raises(AssertionError):
        fuzz_native.test_one_input(fuzz_native.seeds()["compose_f32"])


def test_atheris_short_run(tmp_path):
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "fuzz" / "fuzz_native.py"),
            "-runs=2000",
            "-max_len=4096",
            str(tmp_path),
            str(CORPUS),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Done 2000 runs" in run.stderr
