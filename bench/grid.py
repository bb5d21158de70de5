"""The benchmark grid (every press x compression ratio x task x model): run or resume it, write tables and
plots to ``--out`` and optionally a docs page's results section.

    python bench/grid.py --quick [--doc docs/quality.md]
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from typing import List, Optional, Sequence

from kvbench import report, runner
from kvbench.tasks import TASKS


def _list(kind: str):
    def parse(text: str) -> List[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"empty {kind} list")
        return items

    return parse


def _ratios(text: str) -> List[float]:
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"ratios must be numbers separated by commas, got {text!r}") from None


def _ints(text: str) -> List[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"lengths must be integers separated by commas, got {text!r}") from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="bench/grid.py", description=__doc__)
    p.add_argument(
        "--quick",
        action="store_true",
        help="the ~10-minute grid: contexts of 800 tokens, 2 samples per task and setting",
    )
    p.add_argument(
        "--power",
        action="store_true",
        help="the grid that can tell presses apart: 20 cases per needle task, completion and chat "
        "prompts, 1.5k tokens, ratios 0.5/0.75/0.875, with Wilson intervals and paired McNemar tests",
    )
    p.add_argument(
        "--styles", type=_list("style"), help="completion,chat (plain document or the model's chat template)"
    )
    p.add_argument("--presses", type=_list("press"), help=f"comma-separated, from {', '.join(runner.DEFAULT_PRESSES)}")
    p.add_argument(
        "--ratios", type=_ratios, help=f"comma-separated, in (0, 1) (default {runner.RATIOS}; 0 always runs)"
    )
    p.add_argument("--tasks", type=_list("task"), help=f"comma-separated, from {', '.join(TASKS)}")
    p.add_argument("--lengths", type=_ints, help="context lengths in tokens, comma-separated")
    p.add_argument("--samples", type=int, help="seeded samples per task, length and setting")
    p.add_argument(
        "--settings", type=_list("setting"), help="aware,agnostic (question inside or after the compressed prompt)"
    )
    p.add_argument(
        "--models", type=_list("model"), help=f"comma-separated labels ({', '.join(runner.MODELS)}) or .gguf paths"
    )
    p.add_argument("--out", default="bench/runs/grid", help="output directory (default bench/runs/grid)")
    p.add_argument("--fresh", action="store_true", help="discard earlier results instead of resuming")
    p.add_argument("--report-only", action="store_true", help="only rebuild tables and plots from earlier results")
    p.add_argument("--doc", help="docs page to refresh between the bench-results markers")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)

    if a.quick and a.power:
        p.error("--quick and --power are two different grids: choose one")
    overrides = {
        k: getattr(a, k)
        for k in ("presses", "ratios", "tasks", "lengths", "samples", "settings", "models", "styles")
        if getattr(a, k) is not None
    }
    overrides["out_dir"] = a.out
    grid = runner.BenchConfig.quick if a.quick else runner.BenchConfig.power if a.power else runner.BenchConfig
    config = grid(**overrides)
    try:
        config.validate()
        if a.report_only:
            records = runner.load_records(pathlib.Path(a.out) / "results.jsonl")
            if not records:
                raise ValueError(f"no results in {a.out}: run the benchmark first")
        else:
            records = runner.run(config, fresh=a.fresh, quiet=a.quiet)
        report.write(records, a.out, doc=a.doc)
    except (ValueError, FileNotFoundError) as e:
        print(f"bench/grid.py: error: {e}", file=sys.stderr)
        return 2
    print((pathlib.Path(a.out) / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
