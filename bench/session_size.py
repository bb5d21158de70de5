"""Saved-session size: ``llm.save_session`` of a compressed conversation against llama-cpp-python's
``save_state`` of the same conversation uncompressed, in one run. ``save_state`` holds the whole
context's state (``llama_state``) and, pickled, also the logits rows it keeps (n_batch x vocab floats).

    python bench/session_size.py [--tokens 1500]
"""

from __future__ import annotations

import argparse
import pathlib
import pickle
import tempfile
import time

from kvbench.haystack import passkey_prompt
from pykvcompose import Llama
from pykvcompose.demo import answer
from pykvcompose.presses import parse_press_spec

MIB = 1024 * 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=1500)
    p.add_argument("--presses", nargs="+", default=["kvcompose:0.5", "kvcompose:0.75", "snapkv:0.875"])
    a = p.parse_args()
    llm = Llama(n_ctx=2048, verbose=False)
    toks = llm.tokenize(
        passkey_prompt(lambda s: llm.tokenize(s.encode(), add_bos=False), a.tokens, 0.5, 31337).encode()
    )
    print(f"conversation: {len(toks)} prompt tokens + an 8-token answer, SmolLM2-135M, f16 cache\n")
    rows, base = [], None
    with tempfile.TemporaryDirectory() as d:
        for spec in [None, *a.presses]:
            llm.kv_compress = None if spec is None else parse_press_spec(spec)
            llm.reset()
            answer(llm, toks, 8)
            if spec is None:  # the reference: llama-cpp-python's save_state of the uncompressed conversation
                saved = llm.save_state()
                base = (len(saved.llama_state), len(pickle.dumps(saved)))
            path = pathlib.Path(d) / "s.kvc"
            t0 = time.perf_counter()
            info = llm.save_session(path)
            t1 = time.perf_counter()
            Llama.load_session(path, verbose=False).close()
            t2 = time.perf_counter()
            rows.append((spec or "full (no compression)", info["cells"], info["file_bytes"], t1 - t0, t2 - t1))
    print(
        f"uncompressed save_state: llama_state {base[0] / MIB:.1f} MiB, pickled LlamaState {base[1] / MIB:.1f} MiB "
        "(it also keeps n_batch rows of logits)\n"
    )
    print("| cache | cells | save_session MiB | / llama_state of save_state | / pickled save_state | save s | load s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for spec, cells, size, t_save, t_load in rows:
        print(
            f"| {spec} | {cells} | {size / MIB:.1f} | {size / base[0]:.2f} | {size / base[1]:.3f} | "
            f"{t_save:.2f} | {t_load:.2f} |"
        )
    llm.close()


if __name__ == "__main__":
    main()
