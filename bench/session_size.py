"""Saved-session size: ``llm.save_session`` of a compressed conversation against llama-cpp-python's
``save_state`` of the same conversation uncompressed, in one run.

    python bench/session_size.py [--tokens 1500]
"""

from __future__ import annotations

import argparse
import pathlib
import pickle
import tempfile
import time

from pykvcompose import Llama
from pykvcompose.demo import answer
from pykvcompose.haystack import passkey_prompt
from pykvcompose.presses import parse_press_spec

MIB = 1024 * 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=1500)
    p.add_argument("--presses", nargs="+", default=["kvcompose:0.5", "kvcompose:0.75", "snapkv:0.875"])
    a = p.parse_args()
    llm = Llama(n_ctx=2048, verbose=False)
    toks = llm.tokenize(passkey_prompt(lambda s: llm.tokenize(s.encode(), add_bos=False), a.tokens, 0.5, 31337).encode())
    print(f"conversation: {len(toks)} prompt tokens + an 8-token answer, SmolLM2-135M, f16 cache\n")
    print("| cache | save_state (pickled) MiB | save_session MiB | session / save_state | save s | load s |")
    print("|---|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as d:
        for spec in [None, *a.presses]:
            llm.kv_compress = None if spec is None else parse_press_spec(spec)
            llm.reset()
            answer(llm, toks, 8)
            state = len(pickle.dumps(llm.save_state()))
            path = pathlib.Path(d) / "s.kvc"
            t0 = time.perf_counter()
            info = llm.save_session(path)
            t1 = time.perf_counter()
            Llama.load_session(path).close()
            t2 = time.perf_counter()
            print(f"| {spec or 'full'} | {state / MIB:.1f} | {info['file_bytes'] / MIB:.1f} | "
                  f"{info['file_bytes'] / state:.2f} | {t1 - t0:.2f} | {t2 - t1:.2f} |", flush=True)
    llm.close()


if __name__ == "__main__":
    main()
