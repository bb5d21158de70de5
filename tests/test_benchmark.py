"""The benchmark: task generators, metrics on hand-made inputs, the report, resuming, the CLI."""

import collections
import json
import math
import re

import numpy as np
import pytest

from grid import main as bench_main
from kvbench import metrics, report, runner
from kvbench.tasks import NEEDLE_TASKS, TASKS, Sample, score_output


@pytest.fixture(scope="module")
def tokenize(plain_llm):
    return lambda text: plain_llm.tokenize(text.encode(), add_bos=False)


@pytest.mark.parametrize("task", sorted(TASKS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_task_answers_are_in_the_haystack_and_seeds_reproduce(tokenize, task, seed):
    n = 600
    s = TASKS[task](tokenize, n, seed)
    assert s == TASKS[task](tokenize, n, seed)  # the seed alone decides the sample
    assert s.context != TASKS[task](tokenize, n, seed + 10).context
    assert 0.75 * n <= len(tokenize(s.context)) <= n + 8
    if s.metric == "perplexity":
        assert 50 <= len(tokenize(s.continuation)) <= 80 and s.continuation.strip() not in s.context
        return
    if s.metric == "kl_divergence":
        assert 230 <= len(tokenize(s.continuation)) <= 290 and s.continuation.strip() not in s.context
        return
    for a in s.answers:
        assert re.search(r"(?<!\w)" + re.escape(a) + r"(?!\w)", s.context), a
        assert a not in s.question or task == "variable_tracking" and a not in s.question
    if task == "common_words":
        counts = collections.Counter(re.findall(r"^\d+\. (\w+)$", s.context, re.M))
        top = {w for w, _ in counts.most_common(len(s.answers))}
        assert top == set(s.answers) and min(counts[a] for a in s.answers) > max(
            c for w, c in counts.items() if w not in s.answers
        )
    if task == "variable_tracking":  # the value flows through the whole chain
        value = re.search(r"value (\d+)", s.question).group(1)
        assert f"VAR {s.answers[0]} = {value}" in s.context
        for a, b in zip(s.answers, s.answers[1:]):
            assert f"VAR {b} = VAR {a}" in s.context


def test_a_haystack_whose_joined_text_runs_over_still_fits(tokenize):
    """niah_single seed 18 at 1500 tokens: the joined paragraphs came to 1502 tokens at every one of
    the 8 budgets once tried (each cut by 2, too little to drop a paragraph), and the power grid stopped."""
    s = TASKS["niah_single"](tokenize, 1500, 18)
    assert 1400 <= len(tokenize(s.context)) <= 1500 and s.answers[0] in s.context


@pytest.mark.parametrize("seed", [73, 109])
def test_a_passage_that_runs_out_of_text_still_has_its_continuation(tokenize, seed):
    """kl_divergence seeds 73 and 109 at 1500 tokens: the paragraph after the passage was too long for the
    budget, the text ended with the context, and the continuation was one word (a grid over those seeds
    stopped: "the continuation must have 2..n_batch tokens")."""
    for task, n_continuation in (("kl_divergence", 256), ("perplexity", 64)):
        s = TASKS[task](tokenize, 1500, seed)
        assert 1400 <= len(tokenize(s.context)) <= 1500
        assert n_continuation <= len(tokenize(s.continuation)) <= n_continuation + 16


def test_score_output_matches_whole_words():
    s = Sample("t", 0, "", "", ["894772", "Krakow"])
    assert score_output(s, " 894772. It is in krakow") == 100.0
    assert score_output(s, "8947721 Krakowian") == 0.0
    assert score_output(s, "894772") == 50.0
    with pytest.raises(ValueError, match="perplexity"):
        score_output(Sample("p", 0, "", "", [], metric="perplexity"), "x")


def test_kl_divergence_of_known_distributions():
    p = np.log(np.array([[0.5, 0.5], [0.7, 0.3]]))
    q = np.log(np.array([[0.9, 0.1], [0.7, 0.3]]))
    kl, same = metrics.kl_divergence(p + 3.0, q)  # logits: any offset per row
    assert kl[0] == pytest.approx(0.5 * np.log(0.5 / 0.9) + 0.5 * np.log(0.5 / 0.1))
    assert kl[1] == pytest.approx(0.0, abs=1e-12) and list(same) == [True, True]
    assert list(metrics.kl_divergence(q, q[:, ::-1])[1]) == [False, False]
    with pytest.raises(ValueError, match="one shape"):
        metrics.kl_divergence(p, q[:1])


def test_bootstrap_interval_and_paired_test():
    from kvbench.stats import bootstrap_interval, paired_bootstrap_p

    x = np.random.default_rng(0).normal(1.0, 0.1, 40)
    lo, hi = bootstrap_interval(x)
    assert lo < x.mean() < hi and hi - lo < 0.1
    assert paired_bootstrap_p(x + 0.05, x) < 0.01  # every pair differs the same way
    assert paired_bootstrap_p(x, x) == 1.0 or paired_bootstrap_p(x, x) > 0.5


def test_auc_on_hand_made_curves():
    assert metrics.auc([0, 0.5, 1], [80, 80, 80]) == pytest.approx(80)
    assert metrics.auc([0, 1], [100, 0]) == pytest.approx(50)
    # trapezoids over uneven spacing, divided by the span 0.875
    r, s = [0, 0.25, 0.5, 0.75, 0.875], [100, 100, 50, 0, 0]
    expected = (0.25 * 100 + 0.25 * 75 + 0.25 * 25 + 0) / 0.875
    assert metrics.auc(r, s) == pytest.approx(expected)
    for bad in ([0], [0, 0]), ([0, 1], [1, float("nan")]), ([1, 0], [1, 1]):
        with pytest.raises(ValueError):
            metrics.auc(*bad) if len(bad[0]) == len(bad[1]) else metrics.auc(bad[0], bad[1])


def test_max_ratio_within_tolerance():
    r = [0, 0.25, 0.5, 0.75]
    assert metrics.max_ratio_within(r, [100, 95, 91, 50], 100) == 0.5
    assert metrics.max_ratio_within(r, [100, 80, 95, 95], 100) == 0  # stops at the first miss
    assert metrics.max_ratio_within(r, [10, 10.5, 11, 12], 10, higher_is_better=False) == 0.5
    assert metrics.max_ratio_within([0.25], [10], 100) is None


def test_perplexity_of_known_distributions():
    vocab = 8
    assert metrics.perplexity(np.zeros((5, vocab)), [1, 2, 3, 4, 5]) == pytest.approx(vocab)
    sharp = np.full((3, vocab), -50.0)
    sharp[np.arange(3), [0, 1, 2]] = 50.0
    assert metrics.perplexity(sharp, [0, 1, 2]) == pytest.approx(1.0)
    half = np.log(np.array([[1.0, 1.0, 1e-30, 1e-30]]))
    assert metrics.perplexity(half, [0]) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        metrics.perplexity(np.zeros((2, 4)), [1])


def _rec(press, ratio, task, seed, score, setting="aware", **kw):
    return dict(
        model="m",
        task=task,
        setting=setting,
        length=100,
        seed=seed,
        press=press,
        ratio=ratio,
        score=score,
        key=f"m|{task}|{setting}|100|{seed}",
        context_tokens=100,
        prefill_seconds=1.0,
        select_seconds=0.01,
        rewrite_seconds=0.01,
        decode_tok_s=50.0,
        **kw,
    )


def hand_made_records():
    recs = []
    for seed in (0, 1):
        for task in ("a", "b"):
            recs.append(_rec("full", 0.0, task, seed, 100.0))
            recs.append(_rec("kvcompose", 0.5, task, seed, 100.0 if task == "a" else 80.0, layer_budgets=[60, 40]))
            recs.append(_rec("kvcompose", 0.75, task, seed, 50.0, layer_budgets=[40, 10]))
            recs.append(_rec("bad", 0.5, task, seed, 0.0))
            recs.append(_rec("bad", 0.75, task, seed, 0.0))
        for press, ratio, perplexity in (("full", 0.0, 10.0), ("kvcompose", 0.5, 10.5 + seed)):
            key = f"m|perplexity|agnostic|100|{seed}"
            recs.append(
                dict(model="m", task="perplexity", setting="agnostic", length=100, seed=seed, press=press, ratio=ratio)
                | dict(perplexity=perplexity, key=key)
            )
    recs.append({"model": "gemma", "skipped": "not supported: sliding window"})
    return recs


def test_summary_table_and_plots(tmp_path):
    recs = hand_made_records()
    summary = report.summarize(recs)
    rows = {r["press"]: r for r in summary["rows"]}
    assert rows["kvcompose"]["scores"] == {0.0: 100.0, 0.5: 90.0, 0.75: 50.0}
    assert rows["kvcompose"]["auc"] == pytest.approx((0.5 * 95 + 0.25 * 70) / 0.75)
    assert rows["kvcompose"]["max_ratio_10pct"] == 0.5 and rows["bad"]["max_ratio_10pct"] == 0.0
    assert rows["kvcompose"]["decode_speedup"] == {0.5: 1.0, 0.75: 1.0}
    ppl = summary["perplexity"][0]
    assert ppl["perplexity"] == {0.0: 10.0, 0.5: 11.0} and ppl["max_ratio_10pct"] == 0.5
    assert summary["skipped"] == {"gemma": "not supported: sliding window"}
    text = report.markdown(summary)
    assert "| kvcompose | 100.0 | 90.0 | 50.0 |" in text and "gemma**: not supported" in text
    assert "- ratio 0.5: best press kvcompose (90.0); kvcompose 90.0 - ahead or tied" in text
    assert "kvcompose at 0.5 vs full cache: 90.0 vs 100.0 (not within 5%: +10.0% loss)" in text
    page = tmp_path / "quality.md"
    page.write_text(f"intro\n{report.RESULTS_START}\nold\n{report.RESULTS_END}\ntail\n")
    report.write(recs, str(tmp_path / "out"), doc=str(page))
    out = page.read_text()
    assert out.startswith("intro\n") and out.endswith("tail\n") and "old" not in out and "| kvcompose |" in out
    pngs = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert pngs == ["kvcompose_layer_budgets_m.png", "score_vs_ratio_m_aware.png"]
    assert "![score_vs_ratio_m_aware](out/score_vs_ratio_m_aware.png)" in out
    assert all((tmp_path / "out" / p).stat().st_size > 5000 for p in pngs)
    with pytest.raises(ValueError, match="bench-results"):
        report.update_doc(str(tmp_path / "out" / "results.md"), "x", [])


def test_torn_last_line_is_ignored(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps({"a": 1}) + "\n" + '{"b": ')
    assert runner.load_records(path) == [{"a": 1}]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--presses", "kvcompose,nope"], "unknown press 'nope'"),
        (["--tasks", "haystack"], "unknown task 'haystack'"),
        (["--ratios", "0,0.5"], "ratios must lie in"),
        (["--lengths", "50"], "lengths must be >= 200"),
        (["--settings", "sideways"], "unknown setting"),
        (["--styles", "poem"], "unknown style 'poem'"),
        (["--report-only"], "no results"),
        (["--models", "nonexistent-model"], "unknown model"),
    ],
)
def test_bench_cli_errors(tmp_path, capsys, args, message):
    code = bench_main(args + ["--out", str(tmp_path / "o"), "--quiet"])
    assert code == 2 and message in capsys.readouterr().err


@pytest.mark.model
def test_tiny_grid_runs_and_resumes(tmp_path, capsys):
    args = [
        "--tasks",
        "niah_single,perplexity",
        "--presses",
        "kvcompose,snapkv",
        "--ratios",
        "0.5",
        "--lengths",
        "300",
        "--samples",
        "1",
        "--settings",
        "aware",
        "--models",
        "smollm2-135m",
        "--out",
        str(tmp_path),
        "--quiet",
    ]
    assert bench_main(args) == 0
    first = runner.load_records(tmp_path / "results.jsonl")
    # full + 2 presses for each of the two samples
    assert len(first) == 6 and {r["press"] for r in first} == {"full", "kvcompose", "snapkv"}
    assert all(0 <= r["score"] <= 100 for r in first if "score" in r)
    assert all(math.isfinite(r["perplexity"]) and r["perplexity"] > 1 for r in first if "perplexity" in r)
    assert "smollm2-135m, question-aware" in capsys.readouterr().out
    # interrupt: the second sample's records are lost; a rerun redoes exactly that sample
    keep = [r for r in first if r["task"] == "niah_single"]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in keep))
    assert bench_main(args) == 0
    second = runner.load_records(tmp_path / "results.jsonl")
    assert second[:3] == keep and len(second) == 6
    assert [r["perplexity"] for r in second[3:]] == pytest.approx([r["perplexity"] for r in first[3:]], rel=1e-6)
    assert bench_main(args) == 0 and len(runner.load_records(tmp_path / "results.jsonl")) == 6
    assert (tmp_path / "results.md").exists() and (tmp_path / "results.csv").exists()


@pytest.mark.model
def test_kl_task_compares_every_press_with_the_full_cache(tmp_path, capsys):
    """The KL task: the full cache's own row is 0 nats and every token agrees; compressed rows are measured over
    the continuation's tokens against it, and compared with published KVCompose in the KL table."""
    args = "--tasks kl_divergence --presses kvcompose,snapkv --ratios 0.75 --lengths 300 --samples 1"
    assert bench_main(args.split() + ["--models", "smollm2-135m", "--out", str(tmp_path), "--quiet"]) == 0
    recs = {r["press"]: r for r in runner.load_records(tmp_path / "results.jsonl")}
    assert set(recs) == {"full", "kvcompose", "snapkv"}
    assert recs["full"]["kl"] == 0.0 and recs["full"]["top1"] == 1.0
    for press in ("kvcompose", "snapkv"):
        assert 0.0 < recs[press]["kl"] < 5.0 and 0.0 < recs[press]["top1"] <= 1.0
        assert recs[press]["kl_tokens"] == recs["full"]["kl_tokens"] >= 230
    assert recs["snapkv"]["kl"] != recs["kvcompose"]["kl"]
    assert "KL divergence from the full cache" in capsys.readouterr().out


@pytest.mark.model
def test_the_default_press_row_probes_as_users_get_it(tmp_path):
    """kvcompose-default is KVComposePress(ratio): its lookahead probe when the question is in the prompt
    and for perplexity (the prompt path), the reconstruct probe when the question follows the compressed
    context (compress_context); "kvcompose" is the published reconstruct probe in every setting."""
    args = [
        "--tasks",
        "niah_single,perplexity",
        "--presses",
        "kvcompose,kvcompose-default",
        "--ratios",
        "0.5",
        "--lengths",
        "300",
        "--samples",
        "1",
        "--settings",
        "aware,agnostic",
        "--models",
        "smollm2-135m",
        "--out",
        str(tmp_path),
        "--quiet",
    ]
    assert bench_main(args) == 0
    records = [r for r in runner.load_records(tmp_path / "results.jsonl") if r.get("press", "full") != "full"]
    assert len(records) == 6
    for r in records:
        # probe queries: the whole context for the reconstruct probe, 32 for the lookahead
        reconstruct = r["press"] == "kvcompose" or (r["setting"] == "agnostic" and r["task"] != "perplexity")
        assert r["probe_queries"] == (r["context_tokens"] if reconstruct else 32), r


def test_power_table_counts_intervals_and_paired_tests():
    """20 paired cases: kvcompose finds 15, snapkv 5 of the same (10 discordant, all one way: p = 2/2^10)."""
    recs = []
    for seed in range(20):
        key = f"m|niah_single|aware|100|{seed}"
        base = dict(model="m", task="niah_single", setting="aware", length=100, seed=seed, key=key)
        recs.append(dict(base, press="full", ratio=0.0, score=100.0))
        recs.append(dict(base, press="kvcompose", ratio=0.5, score=100.0 if seed < 15 else 0.0))
        recs.append(dict(base, press="snapkv", ratio=0.5, score=100.0 if seed < 5 else 50.0))
        recs.append(dict(base, press="variable_tracking-only", ratio=0.5, score=0.0, task="variable_tracking"))
    text = "\n".join(report.power(recs, {"niah_single"}))
    assert "| full cache | 20/20 (84-100%) |" in text
    assert f"| kvcompose | 15/20 (53-89%), p={2 / 2**5:.2g} vs full |" in text  # 5 discordant, one way
    assert f"| snapkv | 5/20 (11-47%), p={2 / 2**10:.2g} |" in text
    assert "variable_tracking-only" not in text  # not a needle task
    # with the default press's row in the grid, every other row is compared with it
    recs += [
        dict(r, press="kvcompose-default", score=100.0 if r["seed"] < 18 else 0.0)
        for r in recs
        if r["press"] == "kvcompose"
    ]
    text = "\n".join(report.power(recs, {"niah_single"}))
    assert f"| kvcompose-default | 18/20 (70-97%), p={2 / 2**2:.2g} vs full |" in text
    assert f"| kvcompose | 15/20 (53-89%), p={2 / 2**3:.2g} |" in text  # 3 discordant, one way
    assert "against `kvcompose-default` at the same ratio" in text


@pytest.mark.model
def test_chat_style_and_the_power_grid(tmp_path, capsys):
    assert (
        runner.chat_question(
            "What is the special magic number for x mentioned in the text above? The special magic number for x is"
        )
        == "What is the special magic number for x mentioned in the text above?"
    )
    assert (
        runner.chat_question(
            "Find all variables that are assigned the value 5 in the text above. Answer: the "
            "variables assigned that value are"
        )
        == "Find all variables that are assigned the value 5 in the text above."
    )
    power = runner.BenchConfig.power()
    assert power.samples >= 20 and set(power.styles) == {"completion", "chat"} and power.lengths == (1500,)
    assert set(power.tasks) == set(NEEDLE_TASKS) and power.ratios == (0.5, 0.75, 0.875)

    args = [
        "--power",
        "--tasks",
        "niah_single",
        "--presses",
        "kvcompose,snapkv",
        "--ratios",
        "0.5",
        "--lengths",
        "300",
        "--samples",
        "1",
        "--models",
        "smollm2-135m",
        "--out",
        str(tmp_path),
        "--quiet",
    ]
    assert bench_main(args) == 0
    recs = runner.load_records(tmp_path / "results.jsonl")
    assert len(recs) == 2 * 3 and {r["style"] for r in recs} == {"completion", "chat"}
    chat = [r for r in recs if r["style"] == "chat"]
    assert all(r["key"].endswith("|chat") for r in chat) and chat[0]["context_tokens"] > recs[0]["context_tokens"]
    out = capsys.readouterr().out
    assert "question-aware, chat prompts" in out and "cases found (Wilson 95%)" in out
    assert "| full cache | " in out and "p=" in out
    assert (tmp_path / "score_vs_ratio_smollm2-135m_aware_chat_prompts.png").exists()


@pytest.mark.model
def test_a_passkey_chat_prompt_is_written_in_the_models_own_template(llm):
    """bench/passkey.py and bench/long_context.py once wrote SmolLM2's turns by hand, so Gemma's prompts got the
    wrong template: the turn now comes from the model's chat template."""
    from kvbench.haystack import PASSKEY_QUESTION, passkey_chat_prompt, passkey_prompt

    prompt = passkey_prompt(lambda s: s.split(), 400, 0.5, 12345, seed=1)
    chat = passkey_chat_prompt(llm, prompt)
    body = prompt[: -len(PASSKEY_QUESTION)].rstrip()
    assert "<|im_start|>user\n" + body + "\n\nWhat is the pass key? Answer with the number only.<|im_end|>" in chat
    assert chat.endswith("<|im_start|>assistant\n") and PASSKEY_QUESTION not in chat


@pytest.mark.model
def test_the_cost_bench_times_every_probe_and_a_stream():
    """bench/cost.py on a short prompt and a short streamed document: every probe compressed, the host bytes
    of each probe as the backend reduction sends them (2 x heads x cells floats per layer and ubatch, + layer
    0's mask count), the floor of a one-pass probe, and a table with a ratio per probe and per stream."""
    import cost
    from speed import haystack_tokens

    text_tokens = haystack_tokens(20000)
    row = cost.prompt_rows(256, False, "f16", 1, text_tokens, n_decode=4)
    # the window's 64 queries are one ubatch over the 256 cells the prompt holds (llama.cpp pads to 256)
    assert row["window_host_bytes"] == 4 * (2 * 30 * 9 * 256 + 256)
    for p in cost.PROBES:
        assert row[f"{p}_s"] > 0 and row[f"{p}_parts"] >= 1.0
        assert 0 < row[f"{p}_host_bytes"] <= 4 * (2 * 30 * 9 * 1024 + 1024) * (1 + 256 // 64)
    # the floor of a one-pass probe: the prompt decoded again after itself costs something on top of its prefill
    assert row["one_pass_floor"] > 1.0
    stream = cost.stream_row(700, 256, False, "f16", 1)
    assert stream["stream_s"] > 0 and stream["stream_every1_s"] > 0 and stream["chunk_prefill_s"] > 0
    assert stream["tokens"] > 2 * 256
    md = cost.table([row, stream])
    assert md.count("x (") == 4 and "→ 256" in md and f"| {row['one_pass_floor']:.2f}x |" in md


def test_multi_query_bench_resumes_the_modes_a_run_left_out(tmp_path, monkeypatch):
    """A run with ``--modes independent`` and then one with both modes into the same directory: the second
    answers the multi-turn questions it lacks and writes no independent record twice (records are keyed by
    mode too, not only by press and ratio)."""
    import sys

    import multi_query

    class NoModel:
        def close(self):
            pass

    contexts = []

    def run_context(llm, style, seed, args):
        contexts.append((seed, tuple(args.modes)))
        labels = [("full", 0.0)] + [(p, r) for p in args.presses for r in args.ratios]
        return [
            dict(style=style, seed=seed, press=p, ratio=r, mode=m, question=0, correct=True, output="1", answer="1")
            for p, r in labels
            for m in args.modes
        ]

    monkeypatch.setattr(multi_query, "Llama", lambda *a, **k: NoModel())
    monkeypatch.setattr(multi_query, "locate_model", lambda name: name)
    monkeypatch.setattr(multi_query, "run_context", run_context)
    monkeypatch.setattr(multi_query, "report", lambda records, title: "")
    argv = ["multi_query.py", "--contexts", "2", "--styles", "completion", "--ratios", "0.75", "--out", str(tmp_path)]
    for modes in (["--modes", "independent"], [], []):
        monkeypatch.setattr(sys, "argv", argv + modes)
        multi_query.main()
    recs = runner.load_records(tmp_path / "results.jsonl")
    keys = [(r["seed"], r["press"], r["ratio"], r["mode"]) for r in recs]
    assert len(keys) == len(set(keys)) == 2 * 3 * 2  # seeds x (full, two presses) x modes, each once
    both = tuple(multi_query.MODES)
    assert contexts == [(0, ("independent",)), (1, ("independent",)), (0, both), (1, both)]  # the third: nothing


@pytest.mark.model
def test_multi_query_bench_answers_every_question_from_one_compression(tmp_path, monkeypatch, capsys):
    """bench/multi_query.py on one short context: the full cache and a compressed cache each answer all six
    questions twice (independent requests on one restored state, then one conversation in which each prompt holds
    the earlier answers), the compression happens once per (press, ratio), and the report counts them."""
    import sys

    import multi_query

    from pykvcompose import Llama, default_model_path

    vocab = Llama(default_model_path(), n_ctx=64, vocab_only=True, verbose=False)
    multi_query_text = lambda tokens: vocab.detokenize(tokens).decode(errors="replace")  # noqa: E731

    calls = []
    real_apply = Llama.kv_apply
    monkeypatch.setattr(
        Llama, "kv_apply", lambda self, press, probe: calls.append(press) or real_apply(self, press, probe)
    )
    prompts = []
    real_reply = multi_query.reply
    monkeypatch.setattr(
        multi_query, "reply", lambda llm, tokens, n: prompts.append(tokens) or real_reply(llm, tokens, n)
    )
    argv = ["multi_query.py", "--contexts", "1", "--styles", "completion", "--ratios", "0.75", "--length", "400"]
    monkeypatch.setattr(sys, "argv", argv + ["--out", str(tmp_path)])
    multi_query.main()
    recs = runner.load_records(tmp_path / "results.jsonl")
    # (full, published, default) x modes x questions; one compression per press
    assert len(recs) == 3 * 2 * 6 and len(calls) == 2
    labels = ("full", "kvcompose", "kvcompose-information")
    assert {(r["press"], r["mode"]) for r in recs} == {(p, m) for p in labels for m in multi_query.MODES}
    assert [(c.scoring, c.self_information) for c in calls] == [("reconstruct", False), ("reconstruct", True)]
    turns = [p for p, r in zip(prompts, recs) if r["mode"] == "multi-turn" and r["press"] == "full"]
    llm_text = [multi_query_text(t) for t in turns]
    assert all(b.startswith(a) and len(b) > len(a) for a, b in zip(llm_text, llm_text[1:]))  # one conversation
    full = [r for r in recs if r["press"] == "full" and r["mode"] == "independent"]
    assert sum(r["correct"] for r in full) >= 3  # the full cache reads its facts
    out = capsys.readouterr().out
    assert "completion, independent (1 contexts, 6 questions)" in out and "agrees with full cache" in out


def test_passkey_cases_numbered_from_another_first_case_are_a_new_set():
    """``passkey_cases(..., first=N)`` (``bench/long_context.py --first-case``): the case numbered N of a longer
    set, so a new set's keys and haystack text differ from the default set's at the same depths."""
    from kvbench.haystack import passkey_cases

    tok = lambda s: s.split()  # noqa: E731  (any tokenizer: the cases only count its tokens)
    depths = [0.3, 0.7]
    default, fresh = passkey_cases(tok, 300, depths), passkey_cases(tok, 300, depths, first=100)
    assert fresh == passkey_cases(tok, 300, [0.0] * 100 + depths)[100:]
    assert [d for d, _, _ in fresh] == depths
    for (_, key, prompt), (_, new_key, new_prompt) in zip(default, fresh):
        assert new_key != key and str(new_key) in new_prompt and new_prompt != prompt
