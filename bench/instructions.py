"""Instruction counts of the native kernels under callgrind: the cost measure that a shared, noisy
machine does not disturb.

    python bench/instructions.py [--tokens 2048] [--out bench/runs/instructions]

The sequence state of an n-token prefill of the embedded model (and the probe scores of a real
compression of it) are saved once; then each kernel runs once under ``valgrind --tool=callgrind``
with ``KVC_NUM_THREADS=1``. A count is the difference between two whole runs that start alike
(fixed hash seed, one thread everywhere) and set up the same arguments, one calling the kernel and
one not (through cffi the exported functions give callgrind no entry to toggle on). The reference
is one ``memmove`` of the state's bytes, counted the same way. Prints instructions per KV byte and
the ratio to that memmove.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

# kernel -> the exported function it calls
KERNELS = {
    "compose": "kvc_state_compose",
    "norms_k": "kvc_state_norms",
    "norms_v": "kvc_state_norms",
    "score": "kvc_kvcompose_score",
    "layer_budgets": "kvc_kvcompose_layer_budgets",
    "select_top": "kvc_select_top",
}


def prepare(n: int, work: pathlib.Path) -> dict:
    """Prefill n tokens, compress a copy: save the state, the head scores and the selection."""
    import llama_cpp
    import numpy as np

    from kvbench.haystack import haystack_text
    from pykvcompose import KVComposePress, Llama, _native

    llm = Llama(n_ctx=2 * n + 256, n_batch=512, verbose=False)
    tokens = llm.tokenize(haystack_text()[: 8 * n].encode())[:n]
    press = KVComposePress(0.5)
    probe = llm.kv_probe(tokens, [press])
    ctx = llm._ctx.ctx
    size = llama_cpp.llama_state_seq_get_size(ctx, 0)
    buf = (ctypes.c_uint8 * size)()
    assert llama_cpp.llama_state_seq_get_data(ctx, buf, size, 0) == size
    (work / "state.bin").write_bytes(bytes(buf))
    head_scores = press.head_scores(probe)
    scores = press.score(probe)
    selection = press.select(scores, press.n_kept(n), forced=[n - 1])
    np.save(work / "head_scores.npy", head_scores)
    np.save(work / "scores.npy", scores)
    np.save(work / "selection.npy", selection)
    meta = {
        "tokens": n,
        "n_head_kv": llm.kv_n_head_kv,
        "state_bytes": size,
        "kv_bytes": _native.state_parse(bytes(buf))["kv_bytes"],
        "n_keep": int(selection.shape[-1]),
    }
    (work / "meta.json").write_text(json.dumps(meta))
    llm.close()
    return meta


def run_kernel(kernel: str, work: pathlib.Path) -> None:
    """The process callgrind watches: load the inputs, set up one kernel's arguments and, unless the
    kernel is prefixed "setup-", call it once (the baseline run does all but the call)."""
    call = not kernel.startswith("setup-")
    kernel = kernel.removeprefix("setup-")
    meta = json.loads((work / "meta.json").read_text())
    data = (work / "state.bin").read_bytes()
    if kernel == "memmove":
        dst = ctypes.create_string_buffer(len(data))
        ctypes.memmove(dst, data, len(data) if call else 1)
        return
    import numpy as np

    from pykvcompose import _native

    lib, ffi, f32, i32 = _native._lib, _native.ffi, "float", "int32_t"
    src = ffi.from_buffer("uint8_t[]", bytearray(data))
    g = meta["n_head_kv"]
    if kernel == "compose":
        sel = np.ascontiguousarray(np.load(work / "selection.npy"), dtype=np.int32)
        size = ffi.new("size_t *")
        lib.kvc_state_compose(src, len(data), _native._ptr(sel, i32), *sel.shape, ffi.NULL, 0, size)
        out = np.zeros(size[0], dtype=np.uint8)  # touched before the call: no page faults in it
        args = (src, len(data), _native._ptr(sel, i32), *sel.shape, _native._ptr(out, "uint8_t"), out.size, size)
        fn = lib.kvc_state_compose
    elif kernel in ("norms_k", "norms_v"):
        info = _native.state_parse(data)
        out = np.zeros((info["n_layer"], g, info["n_cells"]), dtype=np.float32)
        args = (src, len(data), _native._part(kernel[-1]), g, _native._ptr(out, f32), out.size)
        fn = lib.kvc_state_norms
    elif kernel == "score":
        hs = np.ascontiguousarray(np.load(work / "head_scores.npy"), dtype=np.float32)
        out = np.zeros((hs.shape[0], g, hs.shape[2]), dtype=np.float32)
        args = (
            _native._ptr(hs, f32),
            hs.shape[0],
            hs.shape[1],
            g,
            hs.shape[2],
            _native.KVC_AGG_MEAN,
            ffi.NULL,
            True,
            _native._ptr(out, f32),
        )
        fn = lib.kvc_kvcompose_score
    elif kernel == "layer_budgets":
        sc = np.ascontiguousarray(np.load(work / "scores.npy"), dtype=np.float32)
        out = np.zeros(sc.shape[0], dtype=np.int32)
        args = (
            _native._ptr(sc, f32),
            *sc.shape,
            int(sc.shape[0] * sc.shape[2] * 0.5),
            _native.KVC_AGG_MEAN,
            0,
            _native._ptr(out, i32),
        )
        fn = lib.kvc_kvcompose_layer_budgets
    elif kernel == "select_top":
        sc = np.ascontiguousarray(np.load(work / "scores.npy"), dtype=np.float32)
        rows, n = sc.shape[0] * sc.shape[1], sc.shape[2]
        out = np.zeros((rows, meta["n_keep"]), dtype=np.int32)
        forced = np.array([n - 1], dtype=np.int32)
        args = (_native._ptr(sc, f32), rows, n, meta["n_keep"], _native._ptr(forced, i32), 1, _native._ptr(out, i32))
        fn = lib.kvc_select_top
    else:
        raise SystemExit(f"unknown kernel {kernel!r}; expected one of {sorted(KERNELS)} or memmove")
    if call and fn(*args) != _native.KVC_OK:
        raise SystemExit(f"{kernel}: {ffi.string(lib.kvc_last_error()).decode()}")


def count(kernel: str, work: pathlib.Path) -> int:
    """Instructions of one run of ``kernel``: a whole process under callgrind, minus the same process
    doing everything but the call (both start alike: fixed hash seed, one thread everywhere)."""
    totals = []
    for run in (kernel, "setup-" + kernel):
        with tempfile.TemporaryDirectory() as tmp:
            out = pathlib.Path(tmp) / "callgrind.out"
            env = dict(os.environ, KVC_NUM_THREADS="1", PYTHONHASHSEED="0", OPENBLAS_NUM_THREADS="1")
            subprocess.run(
                [
                    "valgrind",
                    "--tool=callgrind",
                    f"--callgrind-out-file={out}",
                    sys.executable,
                    __file__,
                    "--run",
                    run,
                    "--work",
                    str(work),
                ],
                check=True,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            m = re.search(r"^(?:summary|totals):\s+(\d+)", out.read_text(errors="replace"), re.M)
            if m is None:
                raise RuntimeError(f"no instruction total in callgrind's output for {run}")
            totals.append(int(m.group(1)))
    return totals[0] - totals[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--out", default="bench/runs/instructions")
    p.add_argument("--work", help="where the saved inputs are (default: a temporary directory)")
    p.add_argument("--run", help=argparse.SUPPRESS)  # the process under callgrind
    a = p.parse_args()
    if a.run:
        run_kernel(a.run, pathlib.Path(a.work))
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = pathlib.Path(a.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        meta = prepare(a.tokens, work)
        memmove = count("memmove", work)
        rows = []
        for kernel, symbol in KERNELS.items():
            ir = count(kernel, work)
            rows.append(
                {
                    "kernel": kernel,
                    "function": symbol,
                    "instructions": ir,
                    "per_kv_byte": ir / meta["kv_bytes"],
                    "vs_memmove": ir / memmove,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    lines = [
        f"Instructions (callgrind, one thread) on the state of a {meta['tokens']}-token prefill: "
        f"{meta['kv_bytes'] / 2**20:.1f} MiB of K/V, {meta['n_keep']} cells kept. "
        f"memmove of the state's {meta['state_bytes']} bytes: {memmove:,} instructions "
        f"({memmove / meta['state_bytes']:.3f} per byte).",
        "",
        "| kernel | function | instructions | per KV byte | / memmove |",
        "|---|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['kernel']} | `{r['function']}` | {r['instructions']:,} | {r['per_kv_byte']:.3f} "
            f"| {r['vs_memmove']:.1f}x |"
        )
    md = "\n".join(lines)
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "memmove": memmove, "rows": rows}, indent=1))
    (out / "results.md").write_text(md + "\n")
    print("\n" + md)


if __name__ == "__main__":
    main()
