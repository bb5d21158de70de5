"""``pykvcompose serve`` under load against llama-cpp-python's own server, on the same requests.

    python bench/server_load.py [--requests 32] [--workers 8] [--press snapkv:0.5] [--n-ctx 512]
                                [--rounds 2] [--n-long 2] [--out bench/runs/server]

Each server is started alone on 127.0.0.1 (the machine has 2 cores: never both at once), warmed
with one request, then sent the same mixed load (kvbench.server_load: chat and completions,
streamed and whole, bad bodies, prompts ~2.5x n_ctx and prompts beyond any limit) from ``--workers``
threads, ``--rounds`` times, alternating servers between rounds. Printed per server: requests/s,
latency percentiles of the answered (200) requests, status counts per kind, resident memory before
and after; and the ratios of ours to plain. Plain llama-cpp-python answers prompts longer than
n_ctx with 400: those rows say what the press buys, not only what it costs.
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import sys
import time

import numpy as np
import openai

from kvbench.server_load import free_port, load_requests, resident_bytes, run_load, run_request, start_server
from pykvcompose.models import default_model_path


def server_argv(which: str, port: int, a) -> list:
    if which == "pykvcompose":
        return [
            sys.executable,
            "-m",
            "pykvcompose",
            "serve",
            "--port",
            str(port),
            "--n-ctx",
            str(a.n_ctx),
            "--kv-compress",
            a.press,
            "--model-alias",
            "m",
            "--threads",
            str(a.threads),
            "--quiet",
        ]
    return [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        a.model,
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
        "--n_ctx",
        str(a.n_ctx),
        "--model_alias",
        "m",
        "--n_threads",
        str(a.threads),
        "--n_threads_batch",
        str(a.threads),
        "--verbose",
        "False",
        "--interrupt_requests",
        "False",
    ]  # as ours: whole answers for every concurrent request


def summarise(outcomes, seconds, rss):
    ok = [o.seconds for o in outcomes if o.status == 200]
    percentile = lambda q: float(np.percentile(ok, q)) if ok else float("nan")  # noqa: E731
    kinds = collections.defaultdict(collections.Counter)
    for o in outcomes:
        kinds[o.kind][o.status] += 1
    return {
        "requests": len(outcomes),
        "seconds": seconds,
        "requests_per_s": len(outcomes) / seconds,
        "answered_200": len(ok),
        "p50_s": percentile(50),
        "p90_s": percentile(90),
        "p99_s": percentile(99),
        "status_by_kind": {k: dict(v) for k, v in sorted(kinds.items())},
        "rss_mib": [round(r / 2**20, 1) if r else None for r in rss],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--press", default="snapkv:0.5,window_size=16")
    p.add_argument("--n-ctx", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument(
        "--n-long",
        type=int,
        default=2,
        help="requests ~2.5x n_ctx (plain llama-cpp-python refuses them; 0 for like-for-like timings)",
    )
    p.add_argument("--model", default=None)
    p.add_argument("--out", default="bench/runs/server")
    a = p.parse_args()
    a.model = a.model or default_model_path()
    requests = load_requests(a.requests, "m", max_tokens=a.max_tokens, n_long=a.n_long, n_ctx=a.n_ctx)
    results = {"pykvcompose": [], "llama-cpp-python": []}
    for rnd in range(a.rounds):
        order = list(results) if rnd % 2 == 0 else list(reversed(results))
        for which in order:
            port = free_port()
            proc = start_server(server_argv(which, port, a), port, timeout=180)
            try:
                client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=600)
                run_request(client, requests[0])  # warm-up: model pages, first graph
                rss0 = resident_bytes(proc.pid)
                t0 = time.perf_counter()
                outcomes = run_load(client, requests, workers=a.workers, timeout=3600)
                seconds = time.perf_counter() - t0
                results[which].append(summarise(outcomes, seconds, [rss0, resident_bytes(proc.pid)]))
            finally:
                proc.terminate()
                proc.wait(timeout=60)
            r = results[which][-1]
            print(
                f"round {rnd + 1} {which:17s} {r['requests_per_s']:.2f} req/s  p50 {r['p50_s']:.2f} s  "
                f"p90 {r['p90_s']:.2f} s  p99 {r['p99_s']:.2f} s  200s {r['answered_200']}/{r['requests']}  "
                f"RSS {r['rss_mib'][0]} -> {r['rss_mib'][1]} MiB",
                flush=True,
            )
    print("\nstatus per kind (last round):")
    for which, runs in results.items():
        print(f"  {which:17s} {runs[-1]['status_by_kind']}")
    ours, plain = results["pykvcompose"], results["llama-cpp-python"]
    print("\nratios ours / plain, per round (same requests; ours also answers the long prompts plain refuses):")
    for rnd, (o, q) in enumerate(zip(ours, plain)):
        print(
            f"  round {rnd + 1}: requests/s {o['requests_per_s'] / q['requests_per_s']:.2f}x, "
            f"p50 latency {o['p50_s'] / q['p50_s']:.2f}x, p90 {o['p90_s'] / q['p90_s']:.2f}x"
        )
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"args": vars(a), "results": results}, indent=1))
    print(f"\nwrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
