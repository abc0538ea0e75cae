"""RULER's synthetic tasks that need no download, reimplemented from NVIDIA/RULER.

The definitions follow RULER's ``scripts/synthetic.yaml`` and ``scripts/data/synthetic/`` (niah.py,
variable_tracking.py, common_words_extraction.py, freq_words_extraction.py): the same templates,
answer prefixes, tokens generated per task, haystack sized by binary search so that the prompt plus
the answer fits the target length, and the ``string_match_all`` score. Differences, all forced by
what is available without a download:

* the multi-value and multi-query needles (``niah_multivalue``, ``niah_multiquery``) sit in the
  noise haystack, where RULER puts them in Paul Graham's essays;
* common-words extraction draws from wonderwords' word lists only (RULER falls back to a list of
  English words it ships when a context needs more distinct words than wonderwords has);
* random draws come from Python's ``random`` with the given seed, not RULER's NumPy stream, so the
  samples are RULER's kind of sample, not its exact ones.

An instruct model's prompt is its chat template around the task text, followed by the answer
prefix (as RULER's chat templates are); ``chat=False`` gives RULER's ``base`` template.
Words and keys come from ``wonderwords``, as in RULER (``pip install 'retro-compile[eval]'``).
"""

from __future__ import annotations

import random
import string
import uuid
from dataclasses import dataclass, field
from functools import cache, cached_property
from typing import Any, Callable, NamedTuple

from .plot import label

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."

class Family(NamedTuple):
    """A RULER task family (scripts/data/synthetic/constants.py)."""

    template: str
    answer_prefix: str
    tokens_to_generate: int

    @property
    def text(self) -> str:
        """The task text as RULER formats it: the template, then the answer prefix."""
        return self.template + self.answer_prefix


FAMILIES: dict[str, Family] = {
    "niah": Family(
        "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
        "I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic "
        "{type_needle_v} for {query} mentioned in the provided text?",
        " The special magic {type_needle_v} for {query} mentioned in the provided text are",
        128,
    ),
    "vt": Family(
        "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
        "Question: Find all variables that are assigned the value {query} in the text above.",
        " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
        "assigned the value {query}, they are: ",
        30,
    ),
    "cwe": Family(
        "Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
        "ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?",
        " Answer: The top 10 words that appear most often in the list are:",
        120,
    ),
    "fwe": Family(
        "Read the following coded text and track the frequency of each coded word. Find the three most "
        "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore "
        "the dots '....'. What are the three most frequently appeared words in the above coded text?",
        " Answer: According to the coded text above, the three most frequently appeared words are:",
        50,
    ),
}


@dataclass(frozen=True)
class Task:
    """One RULER task: its family and the arguments synthetic.yaml gives it."""

    family: str
    args: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_to_generate(self) -> int:
        return FAMILIES[self.family].tokens_to_generate


def _niah(haystack: str, key: str, value: str, keys: int = 1, values: int = 1, queries: int = 1) -> Task:
    return Task("niah", dict(type_haystack=haystack, type_needle_k=key, type_needle_v=value, num_needle_k=keys,
                             num_needle_v=values, num_needle_q=queries))


TASKS: dict[str, Task] = {
    "niah_single_1": _niah("noise", "words", "numbers"),
    "niah_multikey_2": _niah("needle", "words", "numbers"),
    "niah_multikey_3": _niah("needle", "uuids", "uuids"),
    "niah_multivalue": _niah("noise", "words", "numbers", values=4),
    "niah_multiquery": _niah("noise", "words", "numbers", queries=4),
    "vt": Task("vt", dict(num_chains=1, num_hops=4)),
    "cwe": Task("cwe", dict(freq_cw=30, freq_ucw=3, num_cw=10, num_fewshot=1)),
    "fwe": Task("fwe", dict(alpha=2.0, coded_wordlen=6)),
}


@dataclass(frozen=True)
class Sample:
    """One prompt: the text fed to the model (template, context, question, answer prefix), the
    strings the answer must contain, and its token count plus the tokens to generate."""

    task: str
    prompt: str
    answers: list[str]
    length: int


def string_match_all(prediction: str, answers: list[str]) -> float:
    """RULER's score of one prediction: the fraction of the answers it contains (case-insensitive)."""
    text = prediction.lower()
    return sum(answer.lower() in text for answer in answers) / len(answers)


def _wonderwords(name: str) -> list[str]:
    try:
        from wonderwords import random_word
    except ImportError as error:
        raise ImportError("RULER's tasks draw their words from the wonderwords package: "
                          "pip install 'retro-compile[eval]' (or pip install wonderwords)") from error
    return list(random_word._get_words_from_text_file(name))


@cache
def _needle_words() -> tuple[str, ...]:
    """niah's word keys: adjective-noun pairs (about 6 million; built once per process)."""
    nouns, adjectives = _wonderwords("nounlist.txt"), _wonderwords("adjectivelist.txt")
    return tuple(sorted({f"{a}-{n}" for a in adjectives for n in nouns}))


@cache
def _common_words() -> tuple[str, ...]:
    """cwe's words, sorted: nouns, adjectives and verbs."""
    return tuple(sorted(set(_wonderwords("nounlist.txt") + _wonderwords("adjectivelist.txt")
                            + _wonderwords("verblist.txt"))))


def _zeta(alpha: float) -> float:
    """Riemann's zeta at ``alpha`` > 1 (RULER's fwe takes it from SciPy): a partial sum plus the
    Euler-Maclaurin tail, exact to about 1e-12."""
    n = 1000
    head = sum(k ** -alpha for k in range(1, n))
    return head + n ** (1 - alpha) / (alpha - 1) + 0.5 * n ** -alpha + alpha * n ** (-alpha - 1) / 12


class Generator:
    """Makes RULER samples of a target token length with ``tokenizer`` (seeded by ``seed``).

    ``chat``: wrap the task text in the tokenizer's chat template (an instruct model's turn), then
    append the answer prefix; otherwise RULER's ``base`` template, the task text itself.
    """

    def __init__(self, tokenizer, seed: int = 42, chat: bool = True) -> None:
        self.tokenizer = tokenizer
        self.seed = seed
        self.chat = chat and getattr(tokenizer, "chat_template", None) is not None
        self.rng = random.Random(seed)
        self._vt_icl: str | None = None

    # ---------------------------------------------------------------------------------------------
    # Word lists (as RULER builds them from wonderwords)
    # ---------------------------------------------------------------------------------------------
    @cached_property
    def common_words(self) -> list[str]:
        """cwe's words, shuffled with the seed."""
        words = list(_common_words())
        random.Random(self.seed).shuffle(words)
        return words

    def _random(self, kind: str) -> str:
        if kind == "numbers":
            return str(self.rng.randint(10**6, 10**7 - 1))
        if kind == "words":
            return self.rng.choice(_needle_words())
        if kind == "uuids":
            return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
        raise ValueError(f"needle type {kind!r} is not one of 'numbers', 'words', 'uuids'")

    # ---------------------------------------------------------------------------------------------
    # The task families: (task text with its answer prefix, answers) for a haystack of ``size``
    # ---------------------------------------------------------------------------------------------
    def niah(self, size: int, type_haystack: str, type_needle_k: str, type_needle_v: str, num_needle_k: int,
             num_needle_v: int, num_needle_q: int) -> tuple[str, list[str]]:
        num_needle_k = max(num_needle_k, num_needle_q)
        keys, values, needles = [], [], []
        for _ in range(num_needle_k):
            keys.append(self._random(type_needle_k))
            values.append([self._random(type_needle_v) for _ in range(num_needle_v)])
            needles += [NEEDLE.format(type_needle_v=type_needle_v, key=keys[-1], value=v) for v in values[-1]]
        random.Random(self.seed).shuffle(needles)
        if type_haystack == "noise":
            sentences = [NOISE] * size
        elif type_haystack == "needle":
            sentences = [NEEDLE.format(type_needle_v=type_needle_v, key=self._random(type_needle_k),
                                       value=self._random(type_needle_v)) for _ in range(size)]
        else:
            raise ValueError(f"type_haystack={type_haystack!r} is not one of 'noise', 'needle'")
        for index, needle in zip(sorted(self.rng.sample(range(size), len(needles)), reverse=True), needles):
            sentences.insert(index, needle)
        asked = self.rng.sample(range(num_needle_k), num_needle_q)
        queries = [keys[i] for i in asked]
        answers = [v for i in asked for v in values[i]]
        query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
        template = FAMILIES["niah"].text
        if num_needle_q * num_needle_v == 1:  # RULER's singular wording for one answer
            template = (template.replace("Some", "A").replace("are all", "is").replace("are", "is")
                        .replace("answers", "answer"))
            type_needle_v = type_needle_v[:-1]
        return template.format(type_needle_v=type_needle_v, context="\n".join(sentences), query=query), answers

    def vt(self, size: int, num_chains: int, num_hops: int, icl: bool = False) -> tuple[str, list[str]]:
        letters = 3 if icl else 5
        names: list[str] = []
        while len(set(names)) < num_chains * (num_hops + 1):
            names.append("".join(self.rng.choices(string.ascii_uppercase, k=letters)))
        names = list(dict.fromkeys(names))
        chains, chain_names = [], []
        for c in range(num_chains):
            these = names[c * (num_hops + 1):(c + 1) * (num_hops + 1)]
            value = "12345" if icl else str(self.rng.randint(10000, 99999))
            chains.append([f"VAR {these[0]} = {value}"] + [f"VAR {these[j + 1]} = VAR {these[j]} " for j in range(num_hops)])
            chain_names.append(these)
        sentences = [NOISE] * size
        for chain in chains:
            at = sorted(self.rng.sample(range(len(sentences)), len(chain)))
            for j, (position, statement) in enumerate(zip(at, chain)):
                sentences.insert(position + j, statement)
        context = "\n".join(sentences).replace(". \n", ".\n")
        value = chains[0][0].split("=")[-1].strip()
        return FAMILIES["vt"].text.format(context=context, query=value, num_v=num_hops + 1), chain_names[0]

    def _vt_example(self, num_chains: int, num_hops: int) -> str:
        """RULER's in-context example for vt: a short chain (3-letter names, value 12345) with its
        answer, made once per generator and given fresh names and a fresh value for each sample."""
        if self._vt_icl is None:
            size = self._fit(lambda n: self.vt(n, num_chains, num_hops, icl=True), 500, 5)
            text, answer = self.vt(size, num_chains, num_hops, icl=True)
            self._vt_icl = text + " " + " ".join(answer) + "\n"
        example = self._vt_icl
        for name in example.strip().split()[-num_hops - 1:]:
            example = example.replace(name, "".join(self.rng.choices(string.ascii_uppercase, k=len(name))))
        return example.replace("12345", str(self.rng.randint(10000, 99999)))

    def _cwe_list(self, count: int, common_repeats: int, uncommon_repeats: int, common: int) -> tuple[str, list[str]]:
        if count > len(self.common_words):
            raise ValueError(f"cwe: {count} distinct words asked for, wonderwords has {len(self.common_words)}")
        words = self.rng.sample(self.common_words, count)
        frequent, rare = words[:common], words[common:]
        listed = frequent * common_repeats + rare * uncommon_repeats
        random.Random(self.seed).shuffle(listed)
        return " ".join(f"{i + 1}. {w}" for i, w in enumerate(listed)), frequent

    def cwe(self, size: int, freq_cw: int, freq_ucw: int, num_cw: int, num_fewshot: int,
            short: bool = False) -> tuple[str, list[str]]:
        template = FAMILIES["cwe"].text
        shots = []
        for _ in range(num_fewshot):
            context, answer = self._cwe_list(20, 3, 1, num_cw) if short else self._cwe_list(40, 10, 3, num_cw)
            shots.append(template.format(context=context) + " " + " ".join(f"{i + 1}. {w}" for i, w in enumerate(answer)))
        context, answer = self._cwe_list(size, 6, 1, num_cw) if short else self._cwe_list(size, freq_cw, freq_ucw,
                                                                                          num_cw)
        return "\n".join(shots) + "\n" + template.format(context=context), answer

    def fwe(self, size: int, alpha: float, coded_wordlen: int, vocab_size: int) -> tuple[str, list[str]]:
        vocab: set[str] = set()
        while len(vocab) < vocab_size:
            vocab.add("".join(self.rng.choices(string.ascii_lowercase, k=coded_wordlen)))
        ranked = sorted(vocab)
        random.Random(self.seed).shuffle(ranked)
        ranked[0] = "..."  # the most frequent word is noise
        norm = _zeta(alpha)
        text = [w for k, w in enumerate(ranked, start=1) for _ in range(int(size * k ** -alpha / norm))]
        random.Random(self.seed).shuffle(text)
        return FAMILIES["fwe"].text.format(context=" ".join(text)), ranked[1:4]

    # ---------------------------------------------------------------------------------------------
    # Prompts of a target length
    # ---------------------------------------------------------------------------------------------
    def prompt(self, task_text: str, prefix_start: str) -> str:
        """The model's input: the task text (without its answer prefix) in the chat template, then
        the answer prefix. ``prefix_start``: the answer prefix's first characters, to find it."""
        cut = task_text.rfind(prefix_start)
        question, prefix = task_text[:cut], task_text[cut:]
        if not self.chat:
            return question + prefix
        turn = self.tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                                  add_generation_prompt=True)
        return turn + prefix

    def tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _fit(self, make: Callable[[int], tuple[str, list[str]]], budget: int, step: int) -> int:
        """The largest haystack size whose prompt fits ``budget`` tokens, at least ``step``: RULER's
        binary search, its upper bound found by doubling (a small probe misjudges the tokens per
        unit where a task's fixed text, such as cwe's example, is long)."""
        fits = lambda n: self.tokens(make(n)[0]) <= budget  # noqa: E731
        if not fits(step):
            return step
        low, high = step, 2 * step
        while fits(high):
            low, high = high, 2 * high
        while high - low > 1:  # fits(low), not fits(high)
            mid = (low + high) // 2
            low, high = (mid, high) if fits(mid) else (low, mid)
        return low

    def samples(self, name: str, length: int, count: int) -> list[Sample]:
        """``count`` samples of task ``name`` whose prompt plus generated tokens fit ``length`` tokens."""
        task = TASKS[name]
        family, args = task.family, dict(task.args)
        prefix_start = FAMILIES[family].answer_prefix[:10]
        budget = length - task.tokens_to_generate
        if family == "niah":
            make = lambda n: self.niah(n, **args)  # noqa: E731
            step = 25 if length >= 4096 else 5
        elif family == "vt":
            make = lambda n: self._with_example(self.vt(n, **args), args)  # noqa: E731
            step = 10 if length >= 4096 else 5
        elif family == "cwe":
            make = lambda n: self.cwe(n, short=length < 4096, **args)  # noqa: E731
            step = 10
        else:
            args["vocab_size"] = max(length // 50, 4)
            make = lambda n: self.fwe(n, **args)  # noqa: E731
            step = max(length // 32, 1)

        def prompted(n: int) -> tuple[str, list[str]]:
            text, answers = make(n)
            return self.prompt(text, prefix_start), answers

        size = self._fit(prompted, budget, step)
        out = []
        for _ in range(count):
            used = size
            while True:
                text, answers = make(used)
                prompt = self.prompt(text, prefix_start)
                tokens = self.tokens(prompt)
                if tokens <= budget:
                    break
                if used <= step:
                    raise ValueError(f"ruler: a {name} prompt needs {tokens + task.tokens_to_generate} tokens at the "
                                     f"least, more than length={length}")
                used -= step
            out.append(Sample(name, prompt, answers, tokens + task.tokens_to_generate))
        return out

    def _with_example(self, made: tuple[str, list[str]], args: dict[str, Any]) -> tuple[str, list[str]]:
        """vt's sample with RULER's in-context example before it."""
        text, answer = made
        return self._vt_example(args["num_chains"], args["num_hops"]) + "\n" + text, answer


DENSE_FLOOR = 10.0  # a task dense scores at most this on (in %) says nothing about sparse attention


def configuration(row: dict) -> tuple[str, int | None, int, int, str]:
    """The configuration a result row was measured with: (mode, budget, window, sink_pages,
    summaries); rows from before the summary format was recorded held exact summaries."""
    return row["mode"], row["budget"], row["window"], row["sink_pages"], row.get("summaries", "exact")


def same_selection(a: dict, b: dict) -> bool:
    """Whether two result rows select pages alike: the same budget, sink pages and summaries."""
    def selection(row: dict) -> tuple:
        return row.get("budget"), row.get("sink_pages", 0), row.get("summaries", "exact")

    return selection(a) == selection(b)


def join_lengths(into: dict, row: dict) -> None:
    """Add the lengths of ``row`` to ``into``, a result row of the same configuration (from another
    unit of work or another run); a length both hold is an error."""
    for name in ("accuracy", "scores"):
        clash = set(into[name]) & set(row[name])
        if clash:
            raise ValueError(f"{configuration(row)} has lengths {sorted(clash)} in two results")
        into[name].update(row[name])
    into["seconds"] = round(into["seconds"] + row["seconds"], 1)


def add_averages(rows: list[dict], dense_floor: float = DENSE_FLOOR) -> dict[str, list[str]]:
    """Give each result row (``accuracy``: {length: {task: %}}) an ``average`` per length over the
    tasks the dense row scores above ``dense_floor`` on (every task without a dense row); returns
    those tasks per length. Rows with per-sample ``scores`` also get ``vs_dense``, and retro rows
    ``vs_quest`` (against quest at the same budget, sink pages and summaries), paired by sample."""
    dense = next((row for row in rows if row["mode"] == "dense"), None)
    averaged: dict[str, list[str]] = {}
    for row in rows:
        row["average"] = {}
        for length, per_task in row["accuracy"].items():
            tasks = [t for t in per_task if dense is None or dense["accuracy"].get(length, {}).get(t, 0.0) > dense_floor]
            averaged[length] = tasks
            row["average"][length] = sum(per_task[t] for t in tasks) / len(tasks) if tasks else None

    def versus(row: dict, other: dict) -> dict:  # the lengths both rows have (a run may stop early)
        return {length: paired_difference(row["scores"][length], other["scores"][length], tasks)
                for length, tasks in averaged.items() if length in row["scores"] and length in other["scores"]}

    for row in rows:
        if dense is not None and "scores" in row:
            row["vs_dense"] = versus(row, dense)
        if row["mode"] != "retro" or "scores" not in row:
            continue
        quest = next((r for r in rows if r["mode"] == "quest" and "scores" in r and same_selection(r, row)), None)
        if quest is not None:
            row["vs_quest"] = versus(row, quest)
    return averaged


def paired_difference(scores: dict[str, list[float]], dense: dict[str, list[float]], tasks: list[str]) -> dict:
    """The average's difference to dense over ``tasks`` (points) and its standard error, from the
    per-sample differences (both rows scored the same samples, so their noise partly cancels)."""
    if not tasks:
        return dict(difference=None, standard_error=None)
    means, variances = [], []
    for task in tasks:
        diffs = [a - b for a, b in zip(scores[task], dense[task], strict=True)]
        mean = sum(diffs) / len(diffs)
        means.append(mean)
        variances.append(sum((d - mean) ** 2 for d in diffs) / max(len(diffs) - 1, 1) / len(diffs))
    return dict(difference=sum(means) / len(tasks), standard_error=sum(variances) ** 0.5 / len(tasks))


def markdown_table(rows: list[dict], length: str) -> str:
    """One length's results as a Markdown table: a row per configuration, a column per task, then
    the average (tasks dense passes) and its paired difference to dense with its standard error."""
    tasks = list(next(iter(rows))["accuracy"][length])
    lines = ["| configuration | " + " | ".join(tasks) + " | average | vs dense |",
             "|---" * (len(tasks) + 3) + "|"]
    for row in rows:
        name = label(row) + ("" if row["budget"] is None else f" @ {row['budget']}")
        cells = [f"{row['accuracy'][length][t]:.1f}" for t in tasks]
        average = row.get("average", {}).get(length)
        diff = row.get("vs_dense", {}).get(length, {})
        versus = ("" if row["mode"] == "dense" or diff.get("difference") is None
                  else f"{diff['difference']:+.1f} ± {diff['standard_error']:.1f}")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {'' if average is None else f'{average:.1f}'} | {versus} |")
    return "\n".join(lines)
