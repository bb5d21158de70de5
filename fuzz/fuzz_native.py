"""atheris harness over every native entry point that reads a buffer, and the session file reader.

    python fuzz/fuzz_native.py -runs=100000 -max_len=4096 fuzz/corpus     # (`make fuzz`: sanitized library)
    python fuzz/fuzz_native.py --mutate 100000 fuzz/corpus [more dirs]    # seeded mutations, no libFuzzer
    python fuzz/fuzz_native.py --make-corpus fuzz/corpus                  # rewrite the seed inputs

Two modes because gcc's AddressSanitizer runtime, preloaded into Python for the sanitized library,
provides libFuzzer's coverage symbols and so breaks atheris's coverage feedback (libFuzzer then
shrinks the corpus to one byte): `make fuzz` runs atheris, coverage-guided by the Python code it
drives, against the release library, then ``--mutate`` (every corpus input, then seeded truncations,
byte flips, insertions and splices of them) against the sanitized library.

An input is ``target byte, four parameter bytes, payload``. Targets: 0 ``kvc_state_parse``,
1 ``kvc_state_compose`` (selection from the parameters), 2 ``kvc_state_norms``, 3 ``kvc_select_top``,
4 ``kvc_kvcompose_score`` / ``kvc_kvcompose_layer_budgets`` / ``kvc_scores_consensus``, 5 a session file
(``session.parse`` + ``session.check_contents``; the harness appends the SHA-256 so that mutations
reach the header and state parsers). An input may only end in a ``NativeError`` (a native refusal)
or, for session files, a ``SessionError``; any other exception (a ``ValueError`` from the Python side
means the harness called an entry point wrongly and never reached native code), a failed property
check, a crash or a sanitizer report is a finding.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import struct
import sys

import numpy as np

#: The native entry point each target exists to reach (tests check every corpus family reaches it).
TARGET_FUNCTIONS = {
    0: "kvc_state_parse",
    1: "kvc_state_compose",
    2: "kvc_state_norms",
    3: "kvc_select_top",
    4: "kvc_kvcompose_score",
    5: "kvc_state_parse",
}
PARTS = ("k", "v")

MAGIC = 0xAF143CD8
F32, F16, Q8_0 = 0, 1, 8  # ggml_type values


def section(n_cells: int, n_layer: int, n_embd: int, v_trans: bool, type_k: int = F32, pos0: int = 0) -> bytes:
    """One cache section of a ``llama_state_seq_get_data`` buffer (llama_kv_cache::state_write)."""
    rng = np.random.default_rng(n_cells * 131 + n_layer * 7 + n_embd)
    out = [struct.pack("<II", 1, n_cells)]
    out += [struct.pack("<iIi", pos0 + c, 1, 0) for c in range(n_cells)]
    out.append(struct.pack("<II", int(v_trans), n_layer))
    if type_k == Q8_0:  # blocks of 32: f16 scale + 32 int8
        k_row = n_embd // 32 * 34
    else:
        k_row = n_embd * (4 if type_k == F32 else 2)
    for _ in range(n_layer):
        out.append(struct.pack("<iQ", type_k, k_row) + rng.integers(0, 256, n_cells * k_row, dtype=np.uint8).tobytes())
    for _ in range(n_layer):
        values = rng.standard_normal(n_cells * n_embd).astype(np.float32).tobytes()
        if v_trans:
            out.append(struct.pack("<iII", F32, 4, n_embd) + values)
        else:
            out.append(struct.pack("<iQ", F32, n_embd * 4) + values)
    return b"".join(out)


def state(n_cells: int, n_layer: int, n_embd: int, v_trans: bool, type_k: int = F32, swa: bool = False) -> bytes:
    """A whole sequence state; ``swa`` appends a sliding-window cache as iSWA models write it."""
    body = struct.pack("<Ii", MAGIC, 0) + section(n_cells, n_layer, n_embd, v_trans, type_k)
    if swa:
        body += section(2, 1, n_embd, v_trans, type_k, pos0=n_cells - 2)
    return body


def session_body(st: bytes, n_tokens: int) -> bytes:
    """A session file without its trailing SHA-256 (pykvcompose.session's format, version 1)."""
    from pykvcompose import session

    header = {
        "tokens": list(range(1, n_tokens + 1)),
        "n_tokens": n_tokens,
        "compressed_len": 0,
        "compressed_cells": 0,
        "press": None,
        "model_fingerprint": "0" * 64,
    }
    head = json.dumps(header).encode()
    return session.MAGIC + struct.pack("<IQ", 1, len(head)) + head + struct.pack("<Q", len(st)) + st


def seeds() -> dict:
    """Named seed inputs: valid buffers of every layout the parser knows, for every target."""
    s = {
        "f32": state(4, 2, 8, True),
        "f32_plain_v": state(3, 2, 8, False),
        "f16_k": state(3, 1, 8, True, F16),
        "q8_0_k": state(2, 1, 32, False, Q8_0),
        "iswa": state(4, 2, 8, True, swa=True),
    }
    out = {}
    for name, st in s.items():
        out[f"parse_{name}"] = bytes([0, 0, 0, 0, 0]) + st
        # p1 % 4 + 1 kv heads (one for a single q8_0 block per row, else two), p2 % 8 + 1 kept cells
        heads, keep = (0, 1) if name == "q8_0_k" else (1, 2)
        out[f"compose_{name}"] = bytes([1, heads, keep, 0, 7]) + st
        out[f"norms_{name}"] = bytes([2, 1, 2, 0, 0]) + st
    floats = np.linspace(0, 1, 24, dtype=np.float32)
    out["select_top"] = bytes([3, 2, 3, 1, 0]) + floats.tobytes()
    out["kvcompose"] = bytes([4, 2, 1, 2, 128]) + floats.tobytes()
    out["session"] = bytes([5, 0, 0, 0, 0]) + session_body(s["f32"], 4)
    out["session_iswa"] = bytes([5, 0, 0, 0, 0]) + session_body(s["iswa"], 4)
    return out


def test_one_input(data: bytes) -> None:
    from pykvcompose import _native, session

    if len(data) < 5:
        return
    target, p1, p2, p3, p4 = data[:5]
    payload = data[5:]
    try:
        if target % 6 == 5:
            body = payload + hashlib.sha256(payload).digest()
            header, st = session.parse(body)
            session.check_contents(header, st, "<fuzz>", n_vocab=49152, n_ctx=4096, n_layer=2)
        elif target % 6 == 0:
            _native.state_parse(payload)
        elif target % 6 == 1:
            _fuzz_compose(payload, p1, p2, p3, p4)
        elif target % 6 == 2:
            info = _native.state_parse(payload)
            norms = _native.state_norms(payload, PARTS[p1 % 2], p2 % 4 + 1)
            assert norms.shape == (info["n_layer"], p2 % 4 + 1, info["n_cells"])
        elif target % 6 == 3:
            _fuzz_select(payload, p1, p2, p3)
        else:
            _fuzz_scores(payload, p1, p2, p3, p4)
    except (_native.NativeError, session.SessionError):
        pass


def native_calls(data: bytes) -> list:
    """The native functions (``kvc_*``) that ``test_one_input(data)`` called, in order."""
    from pykvcompose import _native

    calls = []
    real = _native._check

    def record(status: int, function: str) -> None:
        calls.append(function)
        real(status, function)

    _native._check = record
    try:
        test_one_input(data)
    finally:
        _native._check = real
    return calls


def _fuzz_compose(payload: bytes, p1: int, p2: int, p3: int, p4: int) -> None:
    from pykvcompose import _native

    info = _native.state_parse(payload)  # compose parses again; this gives a selection of the right shape
    n_cells, n_layer = info["n_cells"], info["n_layer"]
    n_head_kv, n_keep = p1 % 4 + 1, p2 % 8 + 1
    rng = np.random.default_rng(p4)
    if p3 % 4 == 0 and n_keep <= n_cells:  # a valid selection: every row strictly ascending
        sel = np.sort(np.stack([rng.choice(n_cells, n_keep, replace=False) for _ in range(n_layer * n_head_kv)]), 1)
    else:  # anything
        sel = rng.integers(-2, n_cells + 2, size=n_layer * n_head_kv * n_keep)
    sel = sel.reshape(n_layer, n_head_kv, n_keep).astype(np.int32)
    out = _native.state_compose(payload, sel)
    # compose succeeded: the result is a state of n_keep cells whose positions are the sources' newest
    got = _native.state_parse(out)
    assert got["n_cells"] == n_keep and got["n_layer"] == n_layer, got
    assert got["swa_n_cells"] == info["swa_n_cells"]
    expected = info["positions"][sel].max(axis=(0, 1))
    assert (got["positions"] == expected).all(), (got["positions"], expected)


def _fuzz_select(payload: bytes, p1: int, p2: int, p3: int) -> None:
    from pykvcompose import _native

    floats = np.frombuffer(payload[: len(payload) // 4 * 4], dtype=np.float32)
    rows = p1 % 4 + 1
    n = len(floats) // rows
    if n == 0:
        return
    scores = floats[: rows * n].reshape(rows, n)
    n_keep = p2 % (n + 2)  # sometimes 0 or beyond n: must be refused
    forced = [p3 % (n + 1)] if p3 % 3 == 0 else []
    out = _native.select_top(scores, n_keep, forced)
    assert out.shape == (rows, n_keep)
    assert ((out >= 0) & (out < n)).all() and (np.diff(out, axis=1) > 0).all()
    for f in forced:
        assert (out == f).any(axis=1).all()


def _fuzz_scores(payload: bytes, p1: int, p2: int, p3: int, p4: int) -> None:
    from pykvcompose import _native

    floats = np.frombuffer(payload[: len(payload) // 4 * 4], dtype=np.float32)
    n_layer, n_head_kv, group = p1 % 3 + 1, p2 % 3 + 1, p3 % 3 + 1
    n_head = n_head_kv * group
    n = len(floats) // (n_layer * n_head)
    if n == 0:
        return
    head_scores = floats[: n_layer * n_head * n].reshape(n_layer, n_head, n)
    scores = _native.kvcompose_score(head_scores, n_head_kv, "max" if p4 % 2 else "mean")
    budgets = _native.kvcompose_layer_budgets(scores, max(1, (p4 * n_layer * n) // 256), keep_token_lower_bound=p4 % 3)
    assert budgets.shape == (n_layer,) and (budgets >= 1).all() and (budgets <= n).all(), budgets
    _native.scores_consensus(scores, (p4 % 129) / 128.0)


def mutate(data: bytes, other: bytes, rng: np.random.Generator) -> bytes:
    """One libFuzzer-style mutation of ``data`` (``other``: a second input for splices)."""
    b = bytearray(data)
    for _ in range(int(rng.integers(1, 4))):
        kind = int(rng.integers(0, 6))
        at = int(rng.integers(0, len(b) + 1))
        if kind == 0 and b:  # truncate
            del b[max(1, at) :]
        elif kind == 1 and b:  # flip bits / set a byte
            b[min(at, len(b) - 1)] = int(rng.integers(0, 256))
        elif kind == 2:  # insert bytes
            b[at:at] = rng.integers(0, 256, int(rng.integers(1, 9)), dtype=np.uint8).tobytes()
        elif kind == 3 and b:  # an interesting integer over 4 bytes (sizes, counts, types)
            v = int(rng.choice([0, 1, 2, 31, 32, 255, 256, 2**16, 2**31 - 1, 2**31, 2**32 - 1]))
            b[at : at + 4] = v.to_bytes(4, "little")
        elif kind == 4:  # splice in part of another input
            j = int(rng.integers(0, len(other) + 1))
            b[at:] = other[j:]
        elif kind == 5 and len(b) > 8:  # erase a range
            n = int(rng.integers(1, 9))
            del b[at : at + n]
    return bytes(b)


def run_mutations(runs: int, dirs, seed: int = 0) -> None:
    inputs = [p.read_bytes() for d in dirs for p in sorted(pathlib.Path(d).iterdir()) if p.is_file()]
    if not inputs:
        raise SystemExit(f"no inputs in {dirs}")
    for data in inputs:
        test_one_input(data)
    rng = np.random.default_rng(seed)
    for _ in range(runs):
        base = inputs[int(rng.integers(0, len(inputs)))]
        test_one_input(mutate(base, inputs[int(rng.integers(0, len(inputs)))], rng))
    print(f"{len(inputs)} corpus inputs and {runs} mutations: no finding")


def main() -> None:
    if len(sys.argv) >= 4 and sys.argv[1] == "--mutate":
        run_mutations(int(sys.argv[2]), sys.argv[3:])
        return
    if len(sys.argv) == 3 and sys.argv[1] == "--make-corpus":
        corpus = pathlib.Path(sys.argv[2])
        corpus.mkdir(parents=True, exist_ok=True)
        for name, data in seeds().items():
            (corpus / f"seed_{name}").write_bytes(data)
        return
    import atheris

    with atheris.instrument_imports(include=["pykvcompose"]):
        import pykvcompose._native  # noqa: F401
        import pykvcompose.session  # noqa: F401  (instrumented for coverage)
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
