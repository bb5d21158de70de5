"""Tables, plots and the results section of a docs page from the benchmark's raw records."""

from __future__ import annotations

import csv
import json
import os
import pathlib
import re
from collections import defaultdict
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from . import metrics, stats
from .tasks import NEEDLE_TASKS

RESULTS_START = "<!-- bench-results:start -->"
RESULTS_END = "<!-- bench-results:end -->"


def _mean(xs: Sequence[float]) -> float:
    return float(np.mean(xs)) if len(xs) else float("nan")


def summarize(records: List[Dict[str, Any]]) -> Dict[str, Any]:
    """
    Aggregate raw records.

    Returns
    -------
    dict
        ``rows``: one per (model, setting, press) with ``scores`` {ratio: mean task score}, ``auc``,
        ``max_ratio_10pct``, ``per_task`` {task: {ratio: score}}, ``perplexity`` {ratio: mean},
        ``decode_speedup`` {ratio: median decode tok/s relative to the full cache on the same sample},
        ``select_rewrite_vs_prefill`` (median); ``skipped``: {model: reason}.
    """
    skipped = {r["model"]: r["skipped"] for r in records if r.get("skipped")}
    recs = [r for r in records if not r.get("skipped")]
    full_by_sample = {r["key"]: r for r in recs if r["press"] == "full"}
    presses = list(dict.fromkeys(r["press"] for r in recs if r["press"] != "full"))
    rows = []
    groups = sorted({(r["model"], r["setting"]) for r in recs if "score" in r})
    for model, setting in groups:
        for press in ["full"] + presses:
            # the full cache is every press's ratio-0 point
            by = defaultdict(lambda: defaultdict(list))
            for r in recs:
                if r["model"] == model and r["setting"] == setting and "score" in r and r["press"] in (press, "full"):
                    by[r["task"]][0.0 if r["press"] == "full" else float(r["ratio"])].append(r["score"])
            if not by:
                continue
            ratios = sorted({ratio for t in by.values() for ratio in t})
            per_task = {
                task: {ratio: _mean(v[ratio]) for ratio in ratios if v[ratio]} for task, v in sorted(by.items())
            }
            scores = {ratio: _mean([per_task[t][ratio] for t in per_task if ratio in per_task[t]]) for ratio in ratios}
            row = {"model": model, "setting": setting, "press": press, "scores": scores, "per_task": per_task}
            if press != "full" and len(ratios) > 1:
                ys = [scores[x] for x in ratios]
                row["auc"] = metrics.auc(ratios, ys)
                row["max_ratio_10pct"] = metrics.max_ratio_within(ratios, ys, scores[0.0])
                speed, cost = defaultdict(list), []
                for r in recs:
                    if r["model"] == model and r["setting"] == setting and r["press"] == press and "score" in r:
                        full = full_by_sample.get(r["key"])
                        if (
                            full
                            and full.get("decode_tok_s")
                            and r.get("decode_tok_s")
                            and np.isfinite(full["decode_tok_s"])
                            and np.isfinite(r["decode_tok_s"])
                        ):
                            speed[float(r["ratio"])].append(r["decode_tok_s"] / full["decode_tok_s"])
                        cost.append((r["select_seconds"] + r["rewrite_seconds"]) / r["prefill_seconds"])
                row["decode_speedup"] = {x: float(np.median(v)) for x, v in sorted(speed.items())}
                row["select_rewrite_vs_prefill"] = float(np.median(cost)) if cost else None
            rows.append(row)
    # perplexity: question-agnostic by construction
    ppl = defaultdict(lambda: defaultdict(list))
    for r in recs:
        if "perplexity" in r:
            ppl[(r["model"], r["press"])][float(r["ratio"])].append(r["perplexity"])
    perplexity = []
    for (model, press), by_ratio in ppl.items():
        if press == "full":
            continue
        full = ppl.get((model, "full"), {}).get(0.0, [])
        values = {0.0: _mean(full), **{x: _mean(v) for x, v in sorted(by_ratio.items())}}
        ratios = sorted(values)
        perplexity.append(
            {
                "model": model,
                "press": press,
                "perplexity": values,
                "max_ratio_10pct": metrics.max_ratio_within(
                    ratios, [values[x] for x in ratios], values[0.0], higher_is_better=False
                ),
            }
        )
    return {"rows": rows, "perplexity": perplexity, "kl": kl_summary(recs), "skipped": skipped}


def kl_summary(recs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One row per (model, press, ratio) of the KL task: mean KL divergence from the full cache per token (a
    context's mean is the resampled unit) with a bootstrap 95% interval, top-1 agreement, and the paired
    bootstrap p-value against published KVCompose ("kvcompose") at the same ratio on the same contexts."""
    by: Dict[Any, Dict[str, Dict[str, float]]] = defaultdict(dict)
    for r in recs:
        if "kl" in r and r["press"] != "full":
            by[(r["model"], r["press"], float(r["ratio"]))][r["key"]] = r
    rows = []
    for (model, press, ratio), got in sorted(by.items()):
        keys = sorted(got)
        kl = [got[k]["kl"] for k in keys]
        ref = by.get((model, "kvcompose", ratio), {})
        paired = [k for k in keys if k in ref]
        p = None
        if press != "kvcompose" and paired:
            p = stats.paired_bootstrap_p([got[k]["kl"] for k in paired], [ref[k]["kl"] for k in paired])
        rows.append(
            {
                "model": model,
                "press": press,
                "ratio": ratio,
                "contexts": len(keys),
                "tokens": int(sum(got[k]["kl_tokens"] for k in keys)),
                "kl": _mean(kl),
                "kl_interval": stats.bootstrap_interval(kl),
                "top1": _mean([got[k]["top1"] for k in keys]),
                "p_vs_kvcompose": p,
            }
        )
    return rows


def by_style(records: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Records with chat-template samples as a setting of their own ("aware, chat prompts"), so every
    table and plot compares presses on one prompt style (records before styles existed are completion)."""
    out = []
    for r in records:
        style = r.get("style", "completion")
        out.append(
            r if style == "completion" or "setting" not in r else dict(r, setting=f"{r['setting']}, {style} prompts")
        )
    return out


def power(records: List[Dict[str, Any]], needle_tasks: Sequence[str] = NEEDLE_TASKS) -> List[str]:
    """Retrieval counts with Wilson 95% intervals and paired exact McNemar tests, per (model, setting,
    length): a case is found when every answer is in the output; presses are compared on the same cases."""
    found: Dict[tuple, Dict[tuple, Dict[str, bool]]] = defaultdict(lambda: defaultdict(dict))
    tasks: Dict[tuple, set] = defaultdict(set)
    for r in records:
        if not r.get("skipped") and "score" in r and r["task"] in needle_tasks:
            group = (r["model"], r["setting"], r["length"])
            found[group][(r["press"], float(r["ratio"]))][r["key"]] = r["score"] >= 100
            tasks[group].add(r["task"])
    out: List[str] = []
    for (model, setting, length), cells in found.items():
        full = cells.get(("full", 0.0), {})
        cases = sorted(full)
        ratios = sorted({x for (_, x) in cells if x > 0})
        presses = list(dict.fromkeys(p for (p, x) in cells if p != "full"))
        main = reference_press(presses)
        out.append(
            f"### {model}, question-{setting}, {length} tokens: cases found (Wilson 95%), "
            f"{', '.join(sorted(tasks[(model, setting, length)]))}\n"
        )
        out.append("| press | " + " | ".join(f"{x:g}" for x in ratios) + " |")
        out.append("|---|" + "---:|" * len(ratios))
        hits = sum(full[k] for k in cases)
        out.append(f"| full cache | {stats.count_with_interval(hits, len(cases))}" + " |" * len(ratios))
        for press in presses:
            row = []
            for x in ratios:
                got = cells.get((press, x), {})
                if any(k not in got for k in cases):
                    row.append("-")
                    continue
                cell = stats.count_with_interval(sum(got[k] for k in cases), len(cases))
                ref = full if press == main else cells.get((main, x), {})
                if all(k in ref for k in cases):
                    p = stats.mcnemar_exact([got[k] for k in cases], [ref[k] for k in cases])
                    cell += f", p={p:.2g}" + (" vs full" if press == main else "")
                row.append(cell)
            out.append(f"| {press} | " + " | ".join(row) + " |")
        out.append(
            f"\np: exact McNemar test on the same cases, against `{main}` at the same ratio (for "
            f"`{main}`: against the full cache); a difference counts only where p < 0.05.\n"
        )
    return out


def reference_press(presses: Sequence[str]) -> str:
    """The press the others are compared against: KVComposePress's default if it ran, else KVCompose as
    published ("kvcompose")."""
    return "kvcompose-default" if "kvcompose-default" in presses else "kvcompose"


def _fmt(x: Optional[float], digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "-"
    return f"{x:.{digits}f}"


def markdown(summary: Dict[str, Any], config: Optional[Dict[str, Any]] = None, per_task: bool = True) -> str:
    """The results as markdown: one table per (model, setting), verdicts, perplexity, and (``per_task``)
    per-task scores at ratios 0.5 and 0.75."""
    out: List[str] = []
    if config:
        out.append(
            f"Grid: tasks {', '.join(config['tasks'])}; contexts of {', '.join(map(str, config['lengths']))} "
            f"tokens; {config['samples']} seeded samples per task, length and setting.\n"
        )
    for model, setting in dict.fromkeys((r["model"], r["setting"]) for r in summary["rows"]):
        rows = [r for r in summary["rows"] if r["model"] == model and r["setting"] == setting]
        ratios = sorted({x for r in rows for x in r["scores"]})
        out.append(f"### {model}, question-{setting} (mean task score, %)\n")
        out.append(
            "| press | " + " | ".join(f"{x:g}" for x in ratios) + " | AUC | max ratio within 10% "
            "| decode speed vs full @max ratio | select+rewrite / prefill |"
        )
        out.append("|---|" + "---:|" * (len(ratios) + 4))
        for r in sorted(rows, key=lambda r: (r["press"] != "full", -r.get("auc", 0.0))):
            cells = [_fmt(r["scores"].get(x)) for x in ratios]
            if r["press"] == "full":
                out.append(f"| full cache | {cells[0]} |" + " |" * (len(ratios) + 3))
                continue
            speed = r.get("decode_speedup", {})
            top = max(speed) if speed else None
            out.append(
                f"| {r['press']} | " + " | ".join(cells) + f" | {_fmt(r.get('auc'))} | "
                f"{_fmt(r.get('max_ratio_10pct'), 3) if r.get('max_ratio_10pct') is not None else 'none'} | "
                f"{_fmt(speed.get(top), 2) + 'x' if top is not None else '-'} | "
                f"{_fmt(r.get('select_rewrite_vs_prefill'), 4)} |"
            )
        out.append("")
        out.extend(verdict(rows))
        out.append("")
        tasks = sorted({t for r in rows for t in r["per_task"]})
        for x in [x for x in ratios if x in (0.5, 0.75) and per_task]:
            out.append(f"Per task at ratio {x:g} (full cache in the first row):\n")
            out.append("| press | " + " | ".join(tasks) + " |")
            out.append("|---|" + "---:|" * len(tasks))
            full = next((r for r in rows if r["press"] == "full"), None)
            if full:
                out.append(
                    "| full cache | " + " | ".join(_fmt(full["per_task"].get(t, {}).get(0.0)) for t in tasks) + " |"
                )
            for r in rows:
                if r["press"] != "full":
                    out.append(
                        f"| {r['press']} | " + " | ".join(_fmt(r["per_task"].get(t, {}).get(x)) for t in tasks) + " |"
                    )
            out.append("")
    for model in dict.fromkeys(p["model"] for p in summary["perplexity"]):
        rows = [p for p in summary["perplexity"] if p["model"] == model]
        ratios = sorted({x for p in rows for x in p["perplexity"]})
        out.append(
            f"### {model}, perplexity of a held-out continuation after compressing its context (lower is better)\n"
        )
        out.append("| press | " + " | ".join(f"{x:g}" for x in ratios) + " | max ratio within 10% |")
        out.append("|---|" + "---:|" * (len(ratios) + 1))
        for p in sorted(rows, key=lambda p: p["perplexity"].get(0.5, np.inf)):
            m = p["max_ratio_10pct"]
            out.append(
                f"| {p['press']} | "
                + " | ".join(_fmt(p["perplexity"].get(x), 2) for x in ratios)
                + f" | {'none' if m is None else f'{m:g}'} |"
            )
        out.append("")
    for model in dict.fromkeys(r["model"] for r in summary.get("kl", [])):
        rows = [r for r in summary["kl"] if r["model"] == model]
        out.append(
            f"### {model}, KL divergence from the full cache's next-token distributions over a held-out "
            "continuation (question-agnostic compression; lower is better)\n"
        )
        out.append("| press | ratio | mean KL (nats/token, 95% CI) | same top-1 | p vs kvcompose | contexts | tokens |")
        out.append("|---|---:|---:|---:|---:|---:|---:|")
        for r in sorted(rows, key=lambda r: (r["ratio"], r["kl"])):
            lo, hi = r["kl_interval"]
            p = "" if r["p_vs_kvcompose"] is None else f"{r['p_vs_kvcompose']:.3f}"
            out.append(
                f"| {r['press']} | {r['ratio']:g} | {r['kl']:.4f} ({lo:.4f}-{hi:.4f}) | {100 * r['top1']:.1f}% | {p} "
                f"| {r['contexts']} | {r['tokens']} |"
            )
        out.append("")
    for model, why in summary["skipped"].items():
        out.append(f"- **{model}**: {why}")
    return "\n".join(out).rstrip() + "\n"


def verdict(rows: List[Dict[str, Any]]) -> List[str]:
    """The issue's targets, checked on this table: KVCompose first at every ratio >= 0.5, within 5% at 0.5."""
    lines = []
    main = reference_press([r["press"] for r in rows])
    kv = next((r for r in rows if r["press"] == main), None)
    full = next((r for r in rows if r["press"] == "full"), None)
    if kv is None or full is None:
        return lines
    for x in sorted(k for k in kv["scores"] if k >= 0.5):
        best = max((r for r in rows if r["press"] != "full" and x in r["scores"]), key=lambda r: r["scores"][x])
        ahead = kv["scores"][x] >= best["scores"][x]
        lines.append(
            f"- ratio {x:g}: best press {best['press']} ({_fmt(best['scores'][x])}); {main} "
            f"{_fmt(kv['scores'][x])} - {'ahead or tied' if ahead else 'not ahead'}"
        )
    f0 = full["scores"].get(0.0)
    if 0.5 in kv["scores"] and f0:
        gap = (f0 - kv["scores"][0.5]) / f0 * 100
        lines.append(
            f"- {main} at 0.5 vs full cache: {_fmt(kv['scores'][0.5])} vs {_fmt(f0)} "
            f"({'within' if gap <= 5 else 'not within'} 5%: {gap:+.1f}% loss)"
        )
    return lines


def plots(records: List[Dict[str, Any]], summary: Dict[str, Any], out_dir: pathlib.Path) -> List[pathlib.Path]:
    """PNG plots: score vs ratio per (model, setting), and KVCompose's per-layer budget profile."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for model, setting in dict.fromkeys((r["model"], r["setting"]) for r in summary["rows"]):
        rows = [r for r in summary["rows"] if r["model"] == model and r["setting"] == setting]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        full = next((r for r in rows if r["press"] == "full"), None)
        if full:
            ax.axhline(full["scores"][0.0], color="black", linestyle="--", linewidth=1, label="full cache")
        for r in rows:
            if r["press"] != "full":
                xs = sorted(r["scores"])
                style = "-" if r["press"].startswith("kvcompose") else ":"
                ax.plot(xs, [r["scores"][x] for x in xs], style, marker="o", label=r["press"])
        written.append(
            _save(
                fig,
                ax,
                "compression ratio (fraction of KV cells removed)",
                "mean task score (%)",
                f"{model}, question-{setting}",
                out_dir / f"score_vs_ratio_{_slug(model)}_{_slug(setting)}.png",
            )
        )
    for model in dict.fromkeys(r["model"] for r in records if r.get("layer_budgets")):
        by_ratio = defaultdict(list)
        for r in records:
            if r.get("model") == model and r.get("press") == "kvcompose" and r.get("layer_budgets"):
                by_ratio[float(r["ratio"])].append(np.asarray(r["layer_budgets"]) / r["context_tokens"])
        if not by_ratio:
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        for x, profiles in sorted(by_ratio.items()):
            mean = np.mean(profiles, axis=0)
            (line,) = ax.plot(np.arange(mean.size), mean, marker=".", label=f"ratio {x:g}")
            ax.axhline(1 - x, color=line.get_color(), linestyle=":", linewidth=1)
        written.append(
            _save(
                fig,
                ax,
                "layer",
                "budget / context tokens",
                f"{model}: KVCompose layer budgets (dotted: llama.cpp's uniform C)",
                out_dir / f"kvcompose_layer_budgets_{_slug(model)}.png",
            )
        )
    return written


def _save(fig, ax, xlabel: str, ylabel: str, title: str, path: pathlib.Path) -> pathlib.Path:
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s)


def write(records: List[Dict[str, Any]], out_dir: str, doc: Optional[str] = None) -> Dict[str, Any]:
    """Write summary.json, results.csv, results.md and the plots; optionally refresh a docs page's results section."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = by_style(records)
    summary = summarize(records)
    power_text = "\n".join(power(records))
    config_path = out / "config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else None
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    with (out / "results.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "setting", "press", "ratio", "score", "auc", "max_ratio_10pct"])
        for r in summary["rows"]:
            for x, s in sorted(r["scores"].items()):
                w.writerow(
                    [
                        r["model"],
                        r["setting"],
                        r["press"],
                        x,
                        f"{s:.2f}",
                        r.get("auc", ""),
                        r.get("max_ratio_10pct", ""),
                    ]
                )
        for p in summary["perplexity"]:
            for x, v in sorted(p["perplexity"].items()):
                w.writerow([p["model"], "perplexity", p["press"], x, f"{v:.4f}", "", p["max_ratio_10pct"]])
    text = markdown(summary, config) + "\n" + power_text
    (out / "results.md").write_text(text)
    text = (
        markdown(summary, config, per_task=False)
        + "\n"
        + power_text
        + f"\nPer-task tables: `{out.as_posix()}/results.md`.\n"
    )
    try:
        images = plots(records, summary, out)
    except ImportError:
        images = []
        text += "\n(plots need matplotlib: pip install matplotlib)\n"
    if doc:
        update_doc(doc, text, images)
    return summary


def update_doc(doc: str, table: str, images: Sequence[pathlib.Path]) -> None:
    """Replace a docs page's results section (between the bench-results markers) with ``table`` and plots,
    linked relative to the page."""
    path = pathlib.Path(doc)
    text = path.read_text()
    if RESULTS_START not in text or RESULTS_END not in text:
        raise ValueError(f"{doc} has no {RESULTS_START} ... {RESULTS_END} section to update")
    root = path.resolve().parent
    links = []
    for img in images:
        rel = pathlib.Path(os.path.relpath(pathlib.Path(img).resolve(), root))
        links.append(f"![{rel.stem}]({rel.as_posix()})")
    body = f"{RESULTS_START}\n{table}\n" + "\n".join(links) + f"\n{RESULTS_END}"
    head, rest = text.split(RESULTS_START, 1)
    path.write_text(head + body + rest.split(RESULTS_END, 1)[1])
