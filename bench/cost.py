"""What compression costs a user: time to first token against plain llama-cpp-python, in one run.

    python bench/cost.py [--tokens 2048 4096 8192] [--flash off on] [--type-k f16 q8_0]
                         [--stream 3500:1024 7000:2048] [--repeat 2] [--out bench/runs/cost]

For each flash-attention setting and K cache type, on the embedded model:

- prompt compression at each length n: ``create_completion(prompt, max_tokens=1)`` timed on plain
  ``llama_cpp.Llama`` and on ``Llama(kv_compress=KVComposePress(0.75, scoring=...))`` for the window,
  lookahead (the default) and reconstruct probes, and for the reconstruct probe with the sentence
  self-information prior (``self_information=True``, ``compress_context``'s default), all with the same
  ``n_ctx`` (room for the reconstruct probe), the runs interleaved, best of ``--repeat``; the host bytes the
  probe's capture read; the floor of a one-pass probe (the prompt decoded a second time after itself on the plain
  context, nothing captured, against its own prefill: what the reconstruct probe cannot go below); decode speed
  after the default compression against a fresh context holding the same number of cells;
- streaming: a chat pass-key document of N tokens through ``n_ctx=C`` cells with the default press (and
  with ``StreamPolicy(question_every=1)``, the question's probe at every compression) against the full cache
  (plain ``llama_cpp.Llama`` with room for the whole document), with the chunks' own prefill
  (``kv_stream_seconds["prefill"]``) as the floor beside it.

The machine is shared and noisy: every ratio compares runs made moments apart, interleaved.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import llama_cpp
from speed import decode_seconds, haystack_tokens

from kvbench.haystack import passkey_cases, passkey_chat_prompt
from pykvcompose import KVComposePress, Llama, StreamPolicy
from pykvcompose.models import default_model_path
from pykvcompose.support import default_threads

TYPES = {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0}
#: label -> the press's scoring fields ("context": the reconstruct probe with the self-information prior)
PROBES = {
    "window": dict(scoring="window"),
    "lookahead": dict(scoring="lookahead"),
    "reconstruct": dict(scoring="reconstruct"),
    "context": dict(scoring="reconstruct", self_information=True),
}
RATIO = 0.75


def first_token_seconds(llm, prompt) -> float:
    """Time to first token of ``prompt`` (tokens) from an empty cache."""
    llm.reset()
    t0 = time.perf_counter()
    llm.create_completion(prompt, max_tokens=1, temperature=0.0)
    return time.perf_counter() - t0


def one_pass_floor(llm, prompt) -> float:
    """The floor of a one-pass probe such as the reconstruct one, against the prefill: 1 + the time to decode the
    same tokens a second time after them, with nothing captured (their queries attend to n..2n cells), over the
    prefill's own time in the same run."""
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    t1 = time.perf_counter()
    llm.eval(prompt)
    return 1.0 + (time.perf_counter() - t1) / (t1 - t0)


def llama_kwargs(flash: bool, type_k: str, **more) -> dict:
    """Settings shared by every model a row compares (a quantized V cache needs flash attention)."""
    kw = dict(n_batch=512, n_threads=default_threads(), flash_attn=flash, type_k=TYPES[type_k], verbose=False, **more)
    if type_k != "f16" and flash:
        kw["type_v"] = TYPES[type_k]
    return kw


def prompt_rows(n: int, flash: bool, type_k: str, repeat: int, text_tokens, n_decode: int = 32) -> dict:
    path, kw = default_model_path(), llama_kwargs(flash, type_k, n_ctx=2 * n + 256)
    prompt, follow = text_tokens[:n], text_tokens[n : n + n_decode]
    plain = llama_cpp.Llama(path, **kw)
    ours = {p: Llama(path, kv_compress=KVComposePress(RATIO, **fields), **kw) for p, fields in PROBES.items()}
    best = {k: float("inf") for k in ("plain", *PROBES)}
    host_bytes, parts = {}, {p: float("inf") for p in PROBES}
    floor = float("inf")
    for _ in range(repeat):
        best["plain"] = min(best["plain"], first_token_seconds(plain, prompt))
        floor = min(floor, one_pass_floor(plain, prompt))
        for p, llm in ours.items():
            best[p] = min(best[p], first_token_seconds(llm, prompt))
            host_bytes[p] = llm._kv_capture.host_bytes
            st = llm.kv_stats
            assert st["cells_after"] < n, st
            # the same run's own prefill against its probe + selection + rewrite: steadier than whole runs
            parts[p] = min(parts[p], 1.0 + st["compress_seconds"] / st["prefill_seconds"])
    # decode after the default compression vs a fresh context holding as many cells
    cells = ours["lookahead"].kv_stats["cells_after"]
    fresh = llama_cpp.Llama(path, **kw)
    fresh.eval(prompt[:cells])
    d_ours = d_fresh = 0.0
    for _ in range(max(2, repeat)):
        d_ours = max(d_ours, len(follow) / decode_seconds(ours["lookahead"], follow))
        d_fresh = max(d_fresh, len(follow) / decode_seconds(fresh, follow))
    for llm in (plain, fresh, *ours.values()):
        llm.close()
    return {
        "kind": "prompt",
        "tokens": n,
        "flash": flash,
        "type_k": type_k,
        "plain_s": best["plain"],
        **{f"{p}_s": best[p] for p in PROBES},
        **{f"{p}_host_bytes": host_bytes[p] for p in PROBES},
        **{f"{p}_parts": parts[p] for p in PROBES},
        "one_pass_floor": floor,
        "cells_after": cells,
        "decode_tok_s": d_ours,
        "decode_tok_s_fresh": d_fresh,
    }


def stream_row(n: int, n_ctx: int, flash: bool, type_k: str, repeat: int) -> dict:
    """The streamed document with the default policy and with the question's probe at every compression
    (``StreamPolicy(question_every=1)``), against the full cache, runs interleaved."""
    path, kw = default_model_path(), llama_kwargs(flash, type_k)
    full = llama_cpp.Llama(path, n_ctx=n + 512, **kw)
    policies = {"stream": StreamPolicy(), "stream_every1": StreamPolicy(question_every=1)}
    ours = {
        name: Llama(path, n_ctx=n_ctx, kv_compress=KVComposePress(RATIO), kv_stream=p, **kw)
        for name, p in policies.items()
    }
    tokenize = lambda s: full.tokenize(s.encode(), add_bos=False)  # noqa: E731
    ((_, _, doc),) = passkey_cases(tokenize, n, [0.5])
    prompt = full.tokenize(passkey_chat_prompt(full, doc).encode(), special=True)
    best = dict.fromkeys(["full", *ours], float("inf"))
    stream = {}
    for _ in range(repeat):
        best["full"] = min(best["full"], first_token_seconds(full, prompt))
        for name, llm in ours.items():
            t = first_token_seconds(llm, prompt)
            if t < best[name]:
                best[name], stream[name] = t, dict(llm.kv_stream_seconds)
    for llm in (full, *ours.values()):
        llm.close()
    return {
        "kind": "stream",
        "tokens": len(prompt),
        "n_ctx": n_ctx,
        "flash": flash,
        "type_k": type_k,
        "full_s": best["full"],
        **{f"{name}_s": best[name] for name in ours},
        "chunk_prefill_s": stream["stream"].get("prefill", float("nan")),
        "probe_s": stream["stream"].get("probe", float("nan")),
    }


def table(rows) -> str:
    out = [
        "| flash | K | tokens | window | lookahead (default) | reconstruct | reconstruct + self-information "
        "| floor of a one-pass probe | host MiB per probe (window / lookahead / reconstruct / + self-information) "
        "| decode vs fresh context of the same cells |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in (r for r in rows if r["kind"] == "prompt"):
        # time to first token vs plain (whole runs), and (in brackets) 1 + probe/prefill of the same run
        ratios = " | ".join(
            f"{r[f'{p}_s'] / r['plain_s']:.2f}x ({r.get(f'{p}_parts', float('nan')):.2f}x)" for p in PROBES
        )
        mib = " / ".join(f"{r[f'{p}_host_bytes'] / 2**20:.2f}" for p in PROBES)
        out.append(
            f"| {'on' if r['flash'] else 'off'} | {r['type_k']} | {r['tokens']} | {ratios} "
            f"| {r.get('one_pass_floor', float('nan')):.2f}x | {mib} "
            f"| {100 * r['decode_tok_s'] / r['decode_tok_s_fresh']:.0f}% |"
        )
    streams = [r for r in rows if r["kind"] == "stream"]
    if streams:
        out += [
            "",
            "| flash | K | document tokens → n_ctx | streamed vs full cache (time to first token) | with "
            "`question_every=1` | floor: the chunks' own prefill vs full cache | chunk probes s |",
            "|---|---|---|---:|---:|---:|---:|",
        ]
        for r in streams:
            out.append(
                f"| {'on' if r['flash'] else 'off'} | {r['type_k']} | {r['tokens']} → {r['n_ctx']} "
                f"| {r['stream_s'] / r['full_s']:.2f}x | {r['stream_every1_s'] / r['full_s']:.2f}x "
                f"| {r['chunk_prefill_s'] / r['full_s']:.2f}x | {r['probe_s']:.1f} |"
            )
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="*", default=[2048, 4096, 8192])
    p.add_argument("--flash", nargs="+", default=["off", "on"], choices=["off", "on"])
    p.add_argument("--type-k", nargs="+", default=["f16", "q8_0"], choices=sorted(TYPES))
    p.add_argument("--stream", nargs="*", default=["3500:1024", "7000:2048"], help="DOC_TOKENS:N_CTX")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--out", default="bench/runs/cost")
    a = p.parse_args()
    text_tokens = haystack_tokens()
    rows = []
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for flash in a.flash:
        for type_k in a.type_k:
            for n in a.tokens:
                rows.append(prompt_rows(n, flash == "on", type_k, a.repeat, text_tokens))
                print(json.dumps(rows[-1]), flush=True)
            for spec in a.stream:
                n, n_ctx = (int(x) for x in spec.split(":"))
                rows.append(stream_row(n, n_ctx, flash == "on", type_k, a.repeat))
                print(json.dumps(rows[-1]), flush=True)
            (out / "results.json").write_text(json.dumps(rows, indent=1))
    md = table(rows)
    (out / "results.md").write_text(md + "\n")
    print("\n" + md)


if __name__ == "__main__":
    main()
