"""Instruction counts of the native kernels under callgrind: the cost measure that a shared, noisy
machine does not disturb.

    python bench/instructions.py [--tokens 2048] [--out bench/results-instructions]

The sequence state of an n-token prefill of the embedded model (and the probe scores of a real
compression of it) are saved once; then each kernel runs once in its own process under
``valgrind --tool=callgrind --toggle-collect=<kernel>`` with ``KVC_NUM_THREADS=1`` (all work in the
calling thread, so the toggle sees all of it). The reference is one ``memmove`` of the state's bytes,
counted as the difference between a run moving them and a run moving one byte (Python's own calls
to memmove cancel out). Prints instructions per KV byte and the ratio to that memmove.
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

import numpy as np

# kernel -> the exported function callgrind toggles on
KERNELS = {
    "compose": "kvc_state_compose",
    "norms_k": "kvc_state_norms",
    "norms_v": "kvc_state_norms",
    "score": "kvc_kvcompose_score",
    "layer_budgets": "kvc_kvcompose_layer_budgets",
    "select_top": "kvc_select_top",
}
MEMMOVE = "*memmove*"


def prepare(n: int, work: pathlib.Path) -> dict:
    """Prefill n tokens, compress a copy: save the state, the head scores and the selection."""
    import llama_cpp

    from pykvcompose import KVComposePress, Llama, _native
    from pykvcompose.haystack import haystack_text

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
    meta = {"tokens": n, "n_head_kv": llm.kv_n_head_kv, "state_bytes": size,
            "kv_bytes": _native.state_parse(bytes(buf))["kv_bytes"], "n_keep": int(selection.shape[-1])}
    (work / "meta.json").write_text(json.dumps(meta))
    llm.close()
    return meta


def run_kernel(kernel: str, work: pathlib.Path) -> None:
    """The process callgrind watches: load the inputs, call one kernel once."""
    meta = json.loads((work / "meta.json").read_text())
    data = (work / "state.bin").read_bytes()
    if kernel in ("memmove", "memmove-1"):
        n = len(data) if kernel == "memmove" else 1
        dst = ctypes.create_string_buffer(len(data))
        ctypes.memmove(dst, data, n)
        return
    from pykvcompose import _native

    if kernel == "compose":
        _native.state_compose(data, np.load(work / "selection.npy"))
    elif kernel in ("norms_k", "norms_v"):
        _native.state_norms(data, kernel[-1], meta["n_head_kv"])
    elif kernel == "score":
        _native.kvcompose_score(np.load(work / "head_scores.npy"), meta["n_head_kv"])
    elif kernel == "layer_budgets":
        scores = np.load(work / "scores.npy")
        _native.kvcompose_layer_budgets(scores, int(scores.shape[0] * scores.shape[2] * 0.5))
    elif kernel == "select_top":
        scores = np.load(work / "scores.npy")
        _native.select_top(scores, meta["n_keep"], [scores.shape[-1] - 1])
    else:
        raise SystemExit(f"unknown kernel {kernel!r}; expected one of {sorted(KERNELS)} or memmove")


def count(kernel: str, toggle: str, work: pathlib.Path) -> int:
    """Instructions callgrind counts inside ``toggle`` while ``kernel`` runs once."""
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "callgrind.out"
        env = dict(os.environ, KVC_NUM_THREADS="1", PYTHONHASHSEED="0")
        subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", f"--toggle-collect={toggle}",
                        sys.executable, __file__, "--run", kernel, "--work", str(work)],
                       check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        m = re.search(r"^(?:summary|totals):\s+(\d+)", out.read_text(errors="replace"), re.M)
        if m is None:
            raise RuntimeError(f"no instruction total in callgrind's output for {kernel}")
        return int(m.group(1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--out", default="bench/results-instructions")
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
        memmove = count("memmove", MEMMOVE, work) - count("memmove-1", MEMMOVE, work)
        rows = []
        for kernel, symbol in KERNELS.items():
            ir = count(kernel, symbol, work)
            rows.append({"kernel": kernel, "function": symbol, "instructions": ir,
                         "per_kv_byte": ir / meta["kv_bytes"], "vs_memmove": ir / memmove})
            print(json.dumps(rows[-1]), flush=True)
    lines = [f"Instructions (callgrind, one thread) on the state of a {meta['tokens']}-token prefill: "
             f"{meta['kv_bytes'] / 2**20:.1f} MiB of K/V, {meta['n_keep']} cells kept. "
             f"memmove of the state's {meta['state_bytes']} bytes: {memmove:,} instructions "
             f"({memmove / meta['state_bytes']:.3f} per byte).", "",
             "| kernel | function | instructions | per KV byte | / memmove |", "|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['kernel']} | `{r['function']}` | {r['instructions']:,} | {r['per_kv_byte']:.3f} "
                     f"| {r['vs_memmove']:.1f}x |")
    md = "\n".join(lines)
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "memmove": memmove, "rows": rows}, indent=1))
    (out / "results.md").write_text(md + "\n")
    print("\n" + md)


if __name__ == "__main__":
    main()
