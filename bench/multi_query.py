"""One compressed cache, many questions: question-agnostic compression as KVzip and kvpress evaluate reuse.

    python bench/multi_query.py [--contexts 30] [--styles completion chat] [--ratios 0.75 0.875]
                                [--presses kvcompose ...] [--modes independent multi-turn]
                                [--model smollm2-135m] [--out bench/runs/multi-query]

Per context (a 1.5k-token documentation haystack holding three keyed magic numbers, which are each
other's distractors, and a short invented biography): one prefill and one probe (``Llama.kv_probe``),
then per (press, ratio) one compression (``kv_apply`` with the press made question-agnostic, as
``compress_context`` does) and **every** question about the context answered from that same cache, twice:

- ``independent``: each question a separate request on the compressed state restored from one
  ``save_state`` (a saved session opened again);
- ``multi-turn``: all questions one after the other in one conversation, each after the previous
  answer (a chat about a document).

The full cache answers the same way. Reported per question: correct (the fact's value in the answer) and
agreement with the full cache's answer (the same first line); counts with Wilson 95% intervals, exact
McNemar tests against published KVCompose (``kvcompose``) on the same questions. Resumable: records go
to ``--out/results.jsonl``, the tables to ``--out/results.md``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

import llama_cpp
import numpy as np

from kvbench import metrics, one_line, tasks
from kvbench.runner import DEFAULT_PRESSES, chat_text, continuation_logits, load_records, locate_model, user_turn
from kvbench.stats import count_with_interval, mcnemar_exact
from kvbench.tasks import CITIES, FIRST_NAMES, KEY_WORDS, PROFESSIONS, _number, _plant, contains_word
from pykvcompose import KVComposePress, Llama, parse_press_spec
from pykvcompose.demo import answer
from pykvcompose.models import default_model_path
from pykvcompose.streaming import question_agnostic

MODES = ("independent", "multi-turn")
SURNAMES = ("Varga", "Okafor", "Lindqvist", "Moreau", "Tanaka")


@dataclass
class Question:
    """One question about a context: its chat form, its completion form (ending in the answer's lead-in)
    and the value a correct answer contains."""

    chat: str
    completion: str
    answer: str


def fact_document(tokenize, n_tokens: int, seed: int, n_keys: int = 3) -> Tuple[str, List[Question]]:
    """A haystack of about ``n_tokens`` tokens with ``n_keys`` keyed magic numbers and a biography planted at
    seeded depths, and one question per fact (every key's number; the person's city, profession and year)."""
    rng = random.Random(10_000 + seed)
    keys = rng.sample(KEY_WORDS, n_keys)
    values = [_number(rng) for _ in keys]
    first, last = rng.choice(FIRST_NAMES), rng.choice(SURNAMES)
    city, job, year = rng.choice(CITIES), rng.choice(PROFESSIONS), str(rng.randrange(1900, 2000))
    biography = (
        f"{first} {last} was born in {city} in {year}. As a young adult {first} worked as {job}, "
        f"and later wrote a well-known memoir about growing up in {city}."
    )
    needles = [f"One of the special magic numbers for {k} is: {v}." for k, v in zip(keys, values)] + [biography]
    context = _plant(tokenize, rng, n_tokens, needles, [rng.uniform(0.05, 0.95) for _ in needles])
    questions = [
        Question(
            f"What is the special magic number for {k} mentioned in the text above?",
            f"What is the special magic number for {k} mentioned in the text above? "
            f"The special magic number for {k} is",
            v,
        )
        for k, v in zip(keys, values)
    ]
    name = f"{first} {last}"
    questions += [
        Question(
            f"In which city was {name} born?",
            f"Question: in which city was {name} born? Answer: {name} was born in",
            city,
        ),
        Question(
            f"What did {first} work as as a young adult?",
            f"Question: what did {first} work as as a young adult? Answer: as a young adult {first} worked as",
            job.split()[-1],
        ),
        Question(
            f"In which year was {name} born?",
            f"Question: in which year was {name} born? Answer: {name} was born in the year",
            year,
        ),
    ]
    rng.shuffle(questions)
    return context, questions


def token_offsets(llm: Llama, ctx: List[int]) -> Tuple[bytes, np.ndarray]:
    """``ctx``'s text and the byte offset in it where each token's text starts (int64, (tokens,))."""
    text, starts = b"", []
    for t in ctx:
        starts.append(len(text))
        text += llm.detokenize([t])
    return text, np.array(starts)


_LOCAL: Dict[int, llama_cpp.Llama] = {}


def local_information(ctx: List[int], w: int) -> np.ndarray:
    """-log p(token | at most the w..2w tokens before it) in nats, float32 (tokens,): a plain llama-cpp-python
    ``Llama`` of 2w cells (one per w, kept) decodes windows of 2w tokens stepping by w, each scoring its second
    half (the first window all of it). The short window's self-information (issue 32's diagnostics): a fact is
    as surprising as the first of its kind, where the whole context has taught the model the pattern."""
    if w not in _LOCAL:
        path = default_model_path()
        _LOCAL[w] = llama_cpp.Llama(path, n_ctx=2 * w + 8, n_batch=2 * w, logits_all=True, verbose=False)
    loc, n, tokens = _LOCAL[w], len(ctx), np.asarray(ctx)
    info = np.zeros(n, np.float32)
    for start in range(0, n, w):
        a, b = max(0, start - w), min(n, start + w)
        loc.reset()
        loc.eval(ctx[a:b])
        logits = np.array(loc.scores[: b - a], dtype=np.float64)
        top = logits.max(1)
        log_sum = np.log(np.exp(logits - top[:, None]).sum(1)) + top
        i = np.arange(max(start, a + 1), b)
        info[i] = log_sum[i - a - 1] - logits[i - a - 1, tokens[i]]
    return info


def number_tokens(llm: Llama, ctx: List[int], questions: List[Question]) -> Dict[int, np.ndarray]:
    """For each magic-number question (by its index): the positions in ``ctx`` of the tokens that spell the number
    after its needle's "is: " (the diagnostics' view of a fact's digits)."""
    text, at_byte = token_offsets(llm, ctx)
    spans = {}
    for qi, q in enumerate(questions):
        if "magic number" in q.chat:
            at = text.find((": " + q.answer).encode())
            spans[qi] = np.nonzero((at_byte >= at + 1) & (at_byte < at + 2 + len(q.answer)))[0]
    return spans


def probed_fact_document(llm: Llama, seed: int, style: str = "completion"):
    """The diagnostics' start: seed's fact document in ``style``, prefilled on an empty ``llm`` and probed once
    (the reconstruct probe and the self-information, as ``compress_context`` probes it). Returns
    ``(context tokens, questions, probe)``."""
    context, questions = fact_document(lambda t: llm.tokenize(t.encode(), add_bos=False), 1500, seed)
    ctx = Conversation(llm, style, context).context_tokens
    llm.kv_compress = None
    llm.reset()
    probe = llm.kv_probe(ctx, [KVComposePress(0.75, scoring="reconstruct", self_information=True)])
    return ctx, questions, probe


def top_sentences(score: np.ndarray, sentences: np.ndarray, budget: float) -> np.ndarray:
    """(tokens,) True for the sentences of highest ``score`` (each token holds its sentence's value), taken whole
    while they fit in ``budget`` tokens; a sentence that does not fit is passed over (the diagnostics' forced set)."""
    ids, first, size = np.unique(sentences, return_index=True, return_counts=True)
    keep = np.zeros(len(sentences), dtype=bool)
    used = 0
    for k in np.argsort(-score[first], kind="stable"):
        if used + size[k] <= budget:
            keep |= sentences == ids[k]
            used += size[k]
    return keep


def correct(q: Question, text: str) -> bool:
    return contains_word(text, q.answer)


def first_line(text: str) -> str:
    """The answer as compared with the full cache's: its first non-empty line, case and spacing folded."""
    line = next((s for s in text.strip().splitlines() if s.strip()), "")
    return " ".join(line.lower().split()).rstrip(".")


class Conversation:
    """The token streams of a context and its questions, in one prompt style.

    completion: ``context\\n\\nquestion-with-lead-in answer\\n\\nnext question...``; chat: the model's template,
    the context and first question as the first user turn, each later question a new user turn."""

    def __init__(self, llm: Llama, style: str, context: str) -> None:
        self.llm, self.style, self.context = llm, style, context
        if style == "chat":
            probe = user_turn(llm, context + "\n\nQ?")
            self.head = probe[: probe.index(context) + len(context)]
        else:
            self.head = context
        self.context_tokens = self.tokens(self.head, True)  # exactly what is compressed; each prompt starts so

    def tokens(self, text: str, bos: bool) -> List[int]:
        return self.llm.tokenize(text.encode(), add_bos=bos, special=self.style == "chat")

    def prompt(self, turns: List[Tuple[Question, str]], question: Question) -> str:
        """The whole text up to where the answer to ``question`` starts, after ``turns`` (question, answer)."""
        if self.style == "completion":
            text = self.context
            for q, a in turns:
                text += f"\n\n{q.completion} {a.strip()}"
            return text + f"\n\n{question.completion}"
        messages: List[Dict[str, str]] = []
        for i, (q, a) in enumerate(turns + [(question, "")]):
            messages.append({"role": "user", "content": (self.context + "\n\n" if i == 0 else "") + q.chat})
            if a or i < len(turns):
                messages.append({"role": "assistant", "content": a.strip()})
        return chat_text(self.llm, messages)

    def prompt_tokens(self, text: str) -> List[int]:
        """The context's tokens (exactly those compressed) followed by the rest of ``text``."""
        if not text.startswith(self.head):
            raise ValueError("the prompt does not start with the compressed context")
        return self.context_tokens + self.tokens(text[len(self.head) :], False)


def reply(llm: Llama, tokens: List[int], max_tokens: int) -> str:
    """A greedy answer's first line."""
    text = answer(llm, tokens, max_tokens=max_tokens, stop=lambda t: one_line(t) or "\n" in t.strip())["text"]
    return text.strip().split("\n")[0]


def run_context(llm: Llama, style: str, seed: int, args) -> List[Dict[str, Any]]:
    """Every (press, ratio) x mode x question of one context."""
    tokenize = lambda t: llm.tokenize(t.encode(), add_bos=False)  # noqa: E731
    context, questions = fact_document(tokenize, args.length, seed)
    conv = Conversation(llm, style, context)
    ctx = conv.context_tokens
    presses = {
        (label, r): question_agnostic(parse_press_spec(DEFAULT_PRESSES[label].format(ratio=r)))
        for label in args.presses
        for r in args.ratios
    }
    llm.kv_compress = None
    probe = llm.kv_probe(ctx, list(presses.values()))
    plain = llm.save_state()
    records = []
    for (label, ratio), press in [(("full", 0.0), None)] + list(presses.items()):
        llm.load_state(plain)
        stats = llm.kv_apply(press, probe) if press is not None else {"cells_after": len(ctx), "compress_seconds": 0.0}
        state = llm.save_state()
        base = {"style": style, "seed": seed, "press": label, "ratio": ratio, "cells": stats["cells_after"]}
        for mode in args.modes:
            turns: List[Tuple[Question, str]] = []
            for i, q in enumerate(questions):
                if mode == "independent" or i == 0:
                    llm.load_state(state)
                text = reply(
                    llm, conv.prompt_tokens(conv.prompt(turns if mode == "multi-turn" else [], q)), args.max_tokens
                )
                if mode == "multi-turn":
                    turns.append((q, text))
                records.append(
                    dict(
                        base,
                        mode=mode,
                        question=i,
                        answer=q.answer,
                        output=text,
                        correct=correct(q, text),
                        compress_seconds=stats["compress_seconds"],
                        probe_seconds=probe.probe_seconds,
                        prefill_seconds=probe.prefill_seconds,
                    )
                )
    return records


def screen_variants(llm: Llama, compressed, seeds, styles, out) -> None:
    """The screens' driver (``bench/results-*/screen.py``): per seed and style ("completion", "chat", or "kl"
    for the KL divergence of the ``kl_divergence`` task's continuation), ``compressed(ctx, each, full)`` prefills
    and probes ``ctx`` once, calls ``full()`` on the full cache, then ``each(ratio, variant)`` with the cache
    compressed by each variant; every question about the seed's fact document is answered as an independent
    request from that cache. One JSON record per question (or KL) to ``out``; running counts printed."""
    tokenize = lambda t: llm.tokenize(t.encode(), add_bos=False)  # noqa: E731
    tot: Dict[Any, list] = {}

    def record(rec: Dict[str, Any], value) -> None:
        out.write(json.dumps(rec) + "\n")
        tot.setdefault((rec["style"], rec["ratio"], rec["v"]), []).append(value)

    for seed in seeds:
        t0 = time.time()
        for style in styles:
            if style == "kl":
                s = tasks.kl_divergence(tokenize, 1500, seed)
                follow = tokenize(s.continuation)
                ref = []

                def divergence(ratio, v):
                    state = llm.save_state()
                    kl, top = metrics.kl_divergence(ref[0], continuation_logits(llm, follow))
                    llm.load_state(state)
                    rec = dict(seed=seed, style="kl", ratio=ratio, v=v, kl=float(kl.mean()), top1=float(top.mean()))
                    record(rec, rec["kl"])

                ctx = llm.tokenize(s.context.encode(), add_bos=True)
                compressed(ctx, divergence, lambda: ref.append(continuation_logits(llm, follow)))
                continue
            context, questions = fact_document(tokenize, 1500, seed)
            conv = Conversation(llm, style, context)

            def ask(ratio, v):
                state = llm.save_state()
                for i, q in enumerate(questions):
                    llm.load_state(state)
                    text = reply(llm, conv.prompt_tokens(conv.prompt([], q)), 32)
                    ok = correct(q, text)
                    record(dict(seed=seed, style=style, ratio=ratio, v=v, q=i, ok=ok, text=text), ok)
                llm.load_state(state)

            compressed(conv.context_tokens, ask, None)
        out.flush()
        print(seed, f"{time.time() - t0:.0f}s", flush=True)
        for k in sorted(tot):
            vals = tot[k]
            print("  ", k, f"{np.mean(vals):.4f}" if k[0] == "kl" else f"{sum(vals)}/{len(vals)}", flush=True)


def report(records: List[Dict[str, Any]], title: str) -> str:
    """Markdown: per style and mode, every (press, ratio) with correct and agreement counts and McNemar tests."""
    full = {(r["style"], r["seed"], r["mode"], r["question"]): r for r in records if r["press"] == "full"}
    out = [f"## {title}\n"]
    for style in dict.fromkeys(r["style"] for r in records):
        for mode in MODES:
            rows = [r for r in records if r["style"] == style and r["mode"] == mode]
            if not rows:
                continue
            n_ctx = len({r["seed"] for r in rows})
            n_questions = len(rows) // max(1, len({(r["press"], r["ratio"]) for r in rows}))
            out.append(f"### {style}, {mode} ({n_ctx} contexts, {n_questions} questions)\n")
            out.append(
                "| press | ratio | correct (Wilson 95%) | agrees with full cache | McNemar p vs kvcompose (correct) "
                "| compress s |"
            )
            out.append("|---|---:|---:|---:|---:|---:|")
            cells = {}
            for r in rows:
                cells.setdefault((r["press"], r["ratio"]), {})[(r["seed"], r["question"])] = r
            for (press, ratio), got in sorted(
                cells.items(), key=lambda kv: (kv[0][1], kv[0][0] != "kvcompose", kv[0][0])
            ):
                keys = sorted(got)
                ok = [got[k]["correct"] for k in keys]
                agree = [
                    first_line(got[k]["output"]) == first_line(full[(style, k[0], mode, k[1])]["output"])
                    for k in keys
                    if (style, k[0], mode, k[1]) in full
                ]
                ref = cells.get(("kvcompose", ratio), {})
                paired = [k for k in keys if k in ref]
                p = ""
                if press not in ("kvcompose", "full") and paired:
                    p = f"{mcnemar_exact([got[k]['correct'] for k in paired], [ref[k]['correct'] for k in paired]):.3f}"
                secs = sum(got[k]["compress_seconds"] for k in keys) / max(1, len(keys))
                out.append(
                    f"| {press} | {ratio:g} | {count_with_interval(sum(ok), len(ok))} | "
                    f"{count_with_interval(sum(agree), len(agree)) if press != 'full' else ''} | {p} | {secs:.2f} |"
                )
            out.append("")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", type=int, default=30)
    p.add_argument("--first", type=int, default=0, help="seed of the first context")
    p.add_argument("--styles", nargs="+", default=["completion", "chat"], choices=["completion", "chat"])
    p.add_argument("--ratios", type=float, nargs="+", default=[0.75, 0.875])
    p.add_argument(
        "--presses",
        nargs="+",
        default=["kvcompose", "kvcompose-information"],
        choices=sorted(DEFAULT_PRESSES),
        help="kvcompose: as published (the reconstruct probe); kvcompose-information: the same with the sentence "
        "self-information prior (KVComposePress.self_information, compress_context's default)",
    )
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--length", type=int, default=1500)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--out", default="bench/runs/multi-query")
    args = p.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.jsonl"
    records = load_records(path)
    key = lambda r: (r["style"], r["seed"], r["press"], r["ratio"], r["mode"])  # noqa: E731
    done = {key(r) for r in records}
    llm = Llama(locate_model(args.model), n_ctx=2 * args.length + 512, n_batch=512, verbose=False)
    try:
        for style in args.styles:
            for seed in range(args.first, args.first + args.contexts):
                wanted = [("full", 0.0)] + [(label, r) for label in args.presses for r in args.ratios]
                if all((style, seed, label, r, mode) in done for label, r in wanted for mode in args.modes):
                    continue
                new = [r for r in run_context(llm, style, seed, args) if key(r) not in done]
                with path.open("a") as f:
                    for r in new:
                        f.write(json.dumps(r) + "\n")
                records += new
                done |= {key(r) for r in new}
                found = sum(r["correct"] for r in new if r["press"] != "full")
                print(
                    f"{style} #{seed}: {found}/{sum(r['press'] != 'full' for r in new)} compressed answers correct",
                    flush=True,
                )
    finally:
        llm.close()
    (out / "results.md").write_text(report(records, f"{args.model}, question-agnostic, {args.length} tokens"))
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
