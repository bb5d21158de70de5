"""Benchmark tasks generated from scratch with a seed, on offline haystacks.

Every task builds a :class:`Sample`: a context, a question asked after it, the primed start of the
answer, and a scorer. Needle tasks plant their facts inside Python's own documentation
(``pydoc_data.topics``, shipped with CPython); the perplexity task continues a held-out passage.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Sequence

from pykvcompose.demo import paragraphs, take_paragraphs

Tokenize = Callable[[str], List[int]]

#: Words used as needle keys and variable names: short, distinct, one or two tokens each.
KEY_WORDS = (
    "apple",
    "river",
    "candle",
    "falcon",
    "meadow",
    "harbor",
    "violet",
    "copper",
    "lantern",
    "glacier",
    "orchid",
    "saddle",
    "thunder",
    "walnut",
    "pepper",
    "marble",
    "willow",
    "cobalt",
    "ember",
    "quartz",
)
FIRST_NAMES = ("Alice", "Bruno", "Chiara", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ines", "Jonas")
CITIES = ("Lisbon", "Krakow", "Nairobi", "Osaka", "Quito", "Bergen", "Tbilisi", "Hanoi", "Porto", "Dakar")
PROFESSIONS = ("a baker", "a pilot", "a violinist", "a chemist", "a sculptor", "a sailor", "a librarian")


@dataclass
class Sample:
    """
    One benchmark item.

    Attributes
    ----------
    task : str
    seed : int
    context : str
        The document that is compressed.
    question : str
        Asked after the context; question-aware runs compress it together with the context.
    answers : list of str
        What a correct output contains (all of them for full marks).
    metric : {"contains_all", "perplexity", "kl_divergence"}
    continuation : str
        Perplexity and KL tasks only: the held-out text that follows the context.
    """

    task: str
    seed: int
    context: str
    question: str
    answers: List[str]
    metric: str = "contains_all"
    continuation: str = ""
    meta: Dict[str, object] = field(default_factory=dict)


def score_output(sample: Sample, output: str) -> float:
    """Percentage of the sample's answers found in ``output`` (whole words, case-insensitive)."""
    if sample.metric != "contains_all":
        raise ValueError(f"{sample.task} is scored by {sample.metric}, not by an output string")
    return 100.0 * sum(contains_word(output, a) for a in sample.answers) / len(sample.answers)


def contains_word(text: str, answer: str) -> bool:
    """``answer`` appears in ``text`` as whole words, case-insensitive."""
    return re.search(r"(?<![\w])" + re.escape(answer) + r"(?![\w])", text, re.IGNORECASE) is not None


def _filler(tokenize: Tokenize, rng: random.Random, n_tokens: int) -> List[str]:
    """Consecutive documentation paragraphs totalling about ``n_tokens`` tokens, from a seeded start."""
    return take_paragraphs(tokenize, n_tokens, rng.randrange(len(paragraphs())))


def _plant(
    tokenize: Tokenize, rng: random.Random, n_tokens: int, needles: Sequence[str], depths: Sequence[float]
) -> str:
    """A haystack of at most ``n_tokens`` tokens with each needle inserted at its relative depth."""
    budget = n_tokens - sum(len(tokenize(s)) + 1 for s in needles)
    state = rng.getstate()
    for attempt in range(24):
        rng.setstate(state)  # the same filler, shorter, until the joined text fits
        paragraphs = _filler(tokenize, rng, budget)
        for needle, depth in sorted(zip(needles, depths), key=lambda x: -x[1]):
            paragraphs.insert(round(depth * len(paragraphs)), needle)
        text = "\n\n".join(paragraphs)
        over = len(tokenize(text)) - n_tokens
        if over <= 0:
            return text
        # joined paragraphs tokenize a little longer than counted, and a smaller budget changes nothing
        # until it drops a paragraph: after 8 tries (the samples of earlier runs), step down faster
        budget -= over if attempt < 8 else over << (attempt - 7)
    raise RuntimeError(f"could not fit a haystack into {n_tokens} tokens")


def _number(rng: random.Random) -> str:
    return str(rng.randrange(100000, 1000000))


def niah_single(tokenize: Tokenize, n_tokens: int, seed: int) -> Sample:
    """One magic number at a seeded depth; ask for it."""
    rng = random.Random(seed)
    key, value, depth = rng.choice(KEY_WORDS), _number(rng), rng.uniform(0.05, 0.95)
    needle = f"One of the special magic numbers for {key} is: {value}."
    context = _plant(tokenize, rng, n_tokens, [needle], [depth])
    return Sample(
        "niah_single",
        seed,
        context,
        f"What is the special magic number for {key} mentioned in the "
        f"text above? The special magic number for {key} is",
        [value],
        meta={"depth": depth},
    )


def niah_multikey(tokenize: Tokenize, n_tokens: int, seed: int, n_keys: int = 4) -> Sample:
    """Several keys with one number each (distractors); ask for one key."""
    rng = random.Random(seed)
    keys = rng.sample(KEY_WORDS, n_keys)
    values = [_number(rng) for _ in keys]
    needles = [f"One of the special magic numbers for {k} is: {v}." for k, v in zip(keys, values)]
    context = _plant(tokenize, rng, n_tokens, needles, [rng.uniform(0.05, 0.95) for _ in keys])
    i = rng.randrange(n_keys)
    return Sample(
        "niah_multikey",
        seed,
        context,
        f"What is the special magic number for {keys[i]} mentioned in "
        f"the text above? The special magic number for {keys[i]} is",
        [values[i]],
    )


def niah_multivalue(tokenize: Tokenize, n_tokens: int, seed: int, n_values: int = 3) -> Sample:
    """One key with several numbers at several depths; ask for all of them."""
    rng = random.Random(seed)
    key = rng.choice(KEY_WORDS)
    values = [_number(rng) for _ in range(n_values)]
    needles = [f"One of the special magic numbers for {key} is: {v}." for v in values]
    context = _plant(tokenize, rng, n_tokens, needles, [rng.uniform(0.05, 0.95) for _ in values])
    return Sample(
        "niah_multivalue",
        seed,
        context,
        f"What are all the special magic numbers for {key} mentioned "
        f"in the text above? The special magic numbers for {key} are",
        values,
    )


def variable_tracking(tokenize: Tokenize, n_tokens: int, seed: int, n_hops: int = 3) -> Sample:
    """RULER's variable tracking: a value passed along a chain of assignments; name every variable holding it."""
    rng = random.Random(seed)
    names = ["".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)) for _ in range(n_hops + 1)]
    value = str(rng.randrange(10000, 100000))
    needles = [f"VAR {names[0]} = {value}"] + [f"VAR {names[i + 1]} = VAR {names[i]}" for i in range(n_hops)]
    depths = sorted(rng.uniform(0.05, 0.95) for _ in needles)
    context = _plant(tokenize, rng, n_tokens, needles, depths)
    return Sample(
        "variable_tracking",
        seed,
        context,
        f"Find all variables that are assigned the value {value} in "
        "the text above. Answer: the variables assigned that value are",
        names,
    )


def common_words(tokenize: Tokenize, n_tokens: int, seed: int, n_common: int = 3, repeats: int = 12) -> Sample:
    """RULER's common-word extraction: a numbered word list where a few words recur; name the most common."""
    rng = random.Random(seed)
    vocab = sorted({w.lower() for w in re.findall(r"\b[a-zA-Z]{5,9}\b", " ".join(paragraphs()[:400]))})
    common = rng.sample(KEY_WORDS, n_common)
    header = "Below is a numbered list of words. In these words, some appear more often than others.\n"
    words = [w for w in common for _ in range(repeats)]
    fmt = lambda ws: header + "\n".join(f"{i + 1}. {w}" for i, w in enumerate(ws))  # noqa: E731
    # grow the list with rare words until the numbered list reaches the token budget
    step = 32
    while step >= 1:
        more = words + [rng.choice(vocab) for _ in range(step)]
        if len(tokenize(fmt(more))) <= n_tokens:
            words = more
        else:
            step //= 2
    rng.shuffle(words)
    context = fmt(words)
    return Sample(
        "common_words",
        seed,
        context,
        f"What are the {n_common} most common words in the above list? "
        f"Answer: the {n_common} most common words in the list are",
        common,
    )


def passage_qa(tokenize: Tokenize, n_tokens: int, seed: int) -> Sample:
    """Question answering over a short invented biography planted in the haystack."""
    rng = random.Random(seed)
    name = f"{rng.choice(FIRST_NAMES)} {rng.choice(('Varga', 'Okafor', 'Lindqvist', 'Moreau', 'Tanaka'))}"
    city, job, year = rng.choice(CITIES), rng.choice(PROFESSIONS), rng.randrange(1900, 2000)
    passage = (
        f"{name} was born in {city} in {year}. As a young adult {name.split()[0]} worked as {job}, "
        f"and later wrote a well-known memoir about growing up in {city}."
    )
    context = _plant(tokenize, rng, n_tokens, [passage], [rng.uniform(0.05, 0.95)])
    return Sample(
        "passage_qa",
        seed,
        context,
        f"Question: in which city was {name} born? Answer: {name} was born in the city of",
        [city],
    )


def perplexity(tokenize: Tokenize, n_tokens: int, seed: int, n_continuation: int = 64) -> Sample:
    """A documentation passage and its held-out continuation, scored by perplexity after compression."""
    rng = random.Random(seed)
    for _ in range(16):
        # consecutive paragraphs stop before the first one that does not fit: where that one is long, the
        # text can end with no continuation (kl_divergence seeds 73 and 109 at 1500 tokens): with less than
        # half of one, the next draw of the same seed's generator reads elsewhere (other samples stay as
        # they were)
        paragraphs = _filler(tokenize, rng, n_tokens + 4 * n_continuation)
        tokens_text = "\n\n".join(paragraphs)
        # cut at the token budget: the continuation is the next n_continuation tokens' worth of text
        words = tokens_text.split(" ")
        lo, hi = 0, len(words)
        while lo < hi:  # longest word prefix within n_tokens
            mid = (lo + hi + 1) // 2
            if len(tokenize(" ".join(words[:mid]))) <= n_tokens:
                lo = mid
            else:
                hi = mid - 1
        context = " ".join(words[:lo])
        rest = words[lo:]
        k = 1
        while k < len(rest) and len(tokenize(" " + " ".join(rest[:k]))) < n_continuation:
            k += 1
        continuation = " " + " ".join(rest[:k])
        if 2 * len(tokenize(continuation)) >= n_continuation:
            return Sample("perplexity", seed, context, "", [], metric="perplexity", continuation=continuation)
    raise RuntimeError(f"no passage of {n_tokens} tokens and a {n_continuation}-token continuation for seed {seed}")


def kl_divergence(tokenize: Tokenize, n_tokens: int, seed: int, n_continuation: int = 256) -> Sample:
    """The perplexity task's passage with a longer held-out continuation, scored by how far each next-token
    distribution after the compressed context is from the full cache's (``llama-perplexity --kl-divergence``)."""
    s = perplexity(tokenize, n_tokens, seed, n_continuation)
    return Sample("kl_divergence", seed, s.context, "", [], metric="kl_divergence", continuation=s.continuation)


#: Tasks scored against the full cache's (or the text's) next-token distributions, not by an answer.
DISTRIBUTION_TASKS = ("perplexity", "kl_divergence")

#: The tasks scored by exact retrieval (one case is found or not): the power grid's tasks and table.
NEEDLE_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "passage_qa")

#: Task name -> generator(tokenize, n_tokens, seed) -> Sample.
TASKS: Dict[str, Callable[[Tokenize, int, int], Sample]] = {
    "niah_single": niah_single,
    "niah_multikey": niah_multikey,
    "niah_multivalue": niah_multivalue,
    "variable_tracking": variable_tracking,
    "common_words": common_words,
    "passage_qa": passage_qa,
    "perplexity": perplexity,
    "kl_divergence": kl_divergence,
}
