"""RULER's synthetic tasks (retro_compile.eval.ruler): sizes, answers and the score, checked by hand."""

from __future__ import annotations

import collections
import json
import math
import re

import pytest

from retro_compile.eval import ruler
from retro_compile.eval.ruler import FAMILIES, TASKS, Generator, add_averages, markdown_table, string_match_all

from .test_real_model import needs_model

pytest.importorskip("wonderwords")


class WordTokenizer:
    """One token per whitespace-separated word; no chat template (RULER's ``base`` template)."""

    chat_template = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": text.split()}


def test_string_match_all_is_the_fraction_of_answers_found_case_insensitively():
    assert string_match_all("The numbers are 123 and 456.", ["123", "456"]) == 1.0
    assert string_match_all("the value is ABC", ["abc", "def", "ghi", "jkl"]) == 0.25
    assert string_match_all("nothing", ["x1"]) == 0.0


def test_zeta_of_two_is_pi_squared_over_six():
    assert ruler._zeta(2.0) == pytest.approx(math.pi ** 2 / 6, rel=1e-10)
    assert ruler._zeta(3.0) == pytest.approx(1.2020569031595942, rel=1e-10)


@pytest.mark.parametrize("name", list(TASKS))
@pytest.mark.parametrize("length", [1024, 4096])
@pytest.mark.slow
def test_samples_fit_the_length_and_hold_their_answers(name, length):
    """Each sample's prompt plus the task's generated tokens fits the length and fills most of it;
    the prompt ends with the task's answer prefix, and the answers are where the task says."""
    samples = Generator(WordTokenizer(), seed=3).samples(name, length, 3)
    family = TASKS[name].family
    for sample in samples:
        tokens = len(sample.prompt.split())
        assert tokens + TASKS[name].tokens_to_generate == sample.length <= length
        assert sample.length >= 0.8 * length, sample.length
        prefix = FAMILIES[family].answer_prefix  # the answer prefix, its placeholders filled in: its last words are fixed
        ending = "mentioned in the provided text" if family == "niah" else prefix[prefix.rfind("}") + 1:].strip()
        assert ending in sample.prompt[-len(ending) - 5:]
        question = sample.prompt[:sample.prompt.rfind("Answer:") if family != "niah" else len(sample.prompt)]
        if family == "niah":
            for value in sample.answers:
                assert re.search(rf"One of the special magic \w+ for [^:]+ is: {re.escape(value)}\.", sample.prompt)
        elif family == "vt":
            # the chain: the first name holds the value the question asks about, each next one the one before
            first, *rest = sample.answers
            value = re.search(rf"VAR {first} = (\d+)", question).group(1)
            assert f"assigned the value {value}" in sample.prompt
            for before, after in zip(sample.answers, rest):
                assert f"VAR {after} = VAR {before}" in question
        elif family == "cwe":
            listed = re.findall(r"\d+\. ([^\s]+)", question.split("\n")[-2])  # the last list: the question's
            counts = collections.Counter(listed)
            top = {w for w, _ in counts.most_common(len(sample.answers))}
            assert top == set(sample.answers)
        else:  # fwe: the answers are the most frequent words after the noise word "..."
            counts = collections.Counter(question.split(". ", 1)[-1].split())
            ranked = [w for w, _ in counts.most_common() if re.fullmatch(r"[a-z]{6}", w)]
            assert ranked[:3] == sample.answers


def test_averages_leave_out_the_tasks_dense_fails():
    rows = [dict(mode="dense", accuracy={"4096": {"a": 90.0, "b": 5.0, "c": 60.0}}),
            dict(mode="quest", accuracy={"4096": {"a": 70.0, "b": 50.0, "c": 40.0}})]
    assert add_averages(rows) == {"4096": ["a", "c"]}
    assert rows[0]["average"] == {"4096": 75.0} and rows[1]["average"] == {"4096": 55.0}


def test_the_difference_to_dense_is_paired_by_sample():
    """Per task the differences sample by sample, averaged over the tasks dense passes; the
    standard error is that of the mean of the per-task means (hand-computed here)."""
    dense = dict(mode="dense", budget=None, window=1, accuracy={"4096": {"a": 50.0, "b": 0.0}},
                 scores={"4096": {"a": [100.0, 0.0, 100.0, 0.0], "b": [0.0] * 4}})
    quest = dict(mode="quest", accuracy={"4096": {"a": 25.0, "b": 0.0}},
                 scores={"4096": {"a": [100.0, 0.0, 0.0, 0.0], "b": [0.0] * 4}})
    add_averages([dense, quest])
    # task a only (dense fails b): diffs 0, 0, -100, 0, mean -25, sample variance 2500, SE 25
    assert quest["vs_dense"] == {"4096": {"difference": -25.0, "standard_error": 25.0}}
    assert dense["vs_dense"] == {"4096": {"difference": 0.0, "standard_error": 0.0}}
    quest.update(budget=512, window=1)
    assert markdown_table([dense, quest], "4096").splitlines()[2:] == [
        "| dense | 50.0 | 0.0 | 50.0 |  |", "| quest @ 512 | 25.0 | 0.0 | 25.0 | -25.0 ± 25.0 |"]


def test_retro_is_paired_with_quest_at_its_own_budget():
    """vs_quest: retro's paired difference to the quest row of the same budget and sink pages,
    over the tasks dense passes; no other row gets one (hand-computed)."""
    def row(mode, budget, a, sink=0):
        return dict(mode=mode, budget=budget, window=2 if mode == "retro" else 1, sink_pages=sink,
                    accuracy={"4096": {"a": sum(a) / 4, "b": 0.0}}, scores={"4096": {"a": a, "b": [0.0] * 4}})

    rows = [row("dense", None, [100.0] * 4), row("quest", 512, [0.0, 0.0, 100.0, 0.0]),
            row("quest", 1024, [100.0] * 4), row("retro", 512, [100.0, 0.0, 100.0, 0.0]),
            row("retro", 512, [0.0] * 4, sink=1)]
    add_averages(rows)
    # task a only: diffs 100, 0, 0, 0 against quest @ 512: mean 25, sample variance 2500, SE 25
    assert rows[3]["vs_quest"] == {"4096": {"difference": 25.0, "standard_error": 25.0}}
    assert all("vs_quest" not in r for r in rows[:3] + rows[4:])  # no quest row with one sink page


@pytest.mark.slow
@needs_model
def test_the_ruler_command_scores_a_real_model(tmp_path, monkeypatch):
    """``python -m retro_compile.eval ruler`` on SmolLM2 (two needle prompts of 512 tokens): one
    row per configuration with per-task accuracy and the average, a plot beside the JSON, and a
    budget covering the prompt scoring exactly what dense scores (full budget is dense attention)."""
    from retro_compile.eval.cli import main

    monkeypatch.setenv("RETRO_COMPILE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "ruler.json"
    main(["ruler", "--lengths", "512", "--samples", "2", "--tasks", "niah_single_1", "--modes", "dense", "retro",
          "--budgets", "64", "512", "--window", "2", "--device", "cpu", "--out", str(out)])
    data = json.loads(out.read_text())
    rows = {(r["mode"], r["budget"]): r for r in data["results"]}
    assert set(rows) == {("dense", None), ("retro", 64), ("retro", 512)}
    for row in rows.values():
        assert set(row["accuracy"]) == {"512"} and len(row["scores"]["512"]["niah_single_1"]) == 2
    assert rows[("retro", 512)]["scores"] == rows[("dense", None)]["scores"]
    assert out.with_suffix(".png").exists()


def test_merging_runs_joins_a_configurations_lengths_and_refuses_a_length_twice():
    from .benchmark_scripts import load_script

    merge = load_script("merge_results").merge

    def run(length, rows):
        return dict(task="ruler", setup=dict(lengths=[int(length)], samples=2, tasks=["a"], model="m"),
                    results=[dict(mode=m, budget=b, window=w, sink_pages=0, seconds=1.0,
                                  accuracy={length: {"a": sum(s) / 2}}, scores={length: {"a": s}})
                             for m, b, w, s in rows])

    short = run("4096", [("dense", None, 1, [100.0, 100.0]), ("quest", 512, 1, [100.0, 0.0])])
    long = run("8192", [("dense", None, 1, [100.0, 0.0]), ("quest", 512, 1, [0.0, 0.0]),
                        ("quest", 1024, 1, [100.0, 0.0])])
    merged = merge([short, long], ["short.json", "long.json"])
    rows = {(r["mode"], r["budget"]): r for r in merged["results"]}
    assert rows["quest", 512]["accuracy"] == {"4096": {"a": 50.0}, "8192": {"a": 0.0}}
    assert rows["quest", 512]["seconds"] == 2.0 and set(rows["quest", 1024]["accuracy"]) == {"8192"}
    assert rows["quest", 512]["vs_dense"]["8192"] == {"difference": -50.0, "standard_error": 50.0}
    assert merged["setup"]["lengths"] == [4096, 8192]
    assert [i["file"] for i in merged["setup"]["invocations"]] == ["short.json", "long.json"]
    with pytest.raises(ValueError, match="lengths \\['4096'\\] in two results"):
        merge([short, short], ["a", "b"])


def test_merged_rows_of_two_summary_formats_stay_apart_and_pair_with_their_own_quest():
    """An int8-summaries run merged with an exact one: the same mode, budget, window and sink pages
    are two configurations, and a retro row is paired with the quest row of its own format."""
    from retro_compile.eval.plot import label

    from .benchmark_scripts import load_script

    def run(summaries, rows):
        return dict(task="ruler", setup=dict(lengths=[4096], samples=2, tasks=["a"], model="m"),
                    results=[dict(mode=m, budget=512, window=w, sink_pages=0, summaries=summaries, seconds=1.0,
                                  accuracy={"4096": {"a": sum(s) / 2}}, scores={"4096": {"a": s}})
                             for m, w, s in rows])

    exact = run("exact", [("quest", 1, [100.0, 0.0]), ("retro", 2, [100.0, 100.0])])
    int8 = run("int8", [("quest", 1, [0.0, 0.0]), ("retro", 2, [100.0, 0.0])])
    del exact["results"][0]["summaries"]  # a row from before the format was recorded: exact
    merged = load_script("merge_results").merge([exact, int8], ["exact.json", "int8.json"])
    rows = {(r["mode"], r.get("summaries", "exact")): r for r in merged["results"]}
    assert len(merged["results"]) == 4 and set(rows) == {("quest", "exact"), ("retro", "exact"),
                                                          ("quest", "int8"), ("retro", "int8")}
    assert rows["retro", "exact"]["vs_quest"]["4096"]["difference"] == 50.0  # 100 against 50
    assert rows["retro", "int8"]["vs_quest"]["4096"]["difference"] == 50.0  # 50 against 0
    assert label(rows["retro", "int8"]) == "retro w=2, int8 summaries" and label(rows["retro", "exact"]) == "retro w=2"


def test_a_ruler_run_records_each_length_as_it_finishes(tmp_path, monkeypatch):
    """The command's unit of work is a configuration at one length, shortest length first: a run
    joins each configuration's lengths into one row, and a run stopped during its longer length
    keeps the shorter one, scored against dense."""
    from retro_compile.eval import cli

    stop_at = None
    calls = []

    def evaluate(args, run, length):
        if length == stop_at:
            raise KeyboardInterrupt  # the run is stopped here
        calls.append((run[0], length))
        scores = [100.0, 100.0] if run[0] == "dense" else [100.0, 0.0]
        return dict(mode=run[0], budget=run[1], window=run[2], sink_pages=run[3], seconds=1.0,
                    accuracy={str(length): {"a": sum(scores) / 2}}, scores={str(length): {"a": scores}})

    monkeypatch.setattr(cli, "evaluate", evaluate)
    monkeypatch.setattr(cli, "load", lambda args: (None, None, {}, 8192))
    monkeypatch.setattr("retro_compile.eval.plot.plot", lambda path: None)
    out = tmp_path / "ruler.json"
    argv = ["ruler", "--lengths", "8192", "4096", "--samples", "2", "--modes", "dense", "quest", "--budgets", "512",
            "--device", "cpu", "--out", str(out)]
    cli.main(argv)
    assert calls == [("dense", 4096), ("quest", 4096), ("dense", 8192), ("quest", 8192)]
    rows = json.loads(out.read_text())["results"]
    assert [(r["mode"], sorted(r["accuracy"]), r["seconds"]) for r in rows] == [
        ("dense", ["4096", "8192"], 2.0), ("quest", ["4096", "8192"], 2.0)]
    assert rows[1]["vs_dense"]["8192"]["difference"] == -50.0

    stop_at = 8192
    with pytest.raises(KeyboardInterrupt):
        cli.main(argv)
    rows = json.loads(out.read_text())["results"]
    assert [(r["mode"], list(r["accuracy"])) for r in rows] == [("dense", ["4096"]), ("quest", ["4096"])]
    assert rows[1]["average"] == {"4096": 50.0} and rows[1]["vs_dense"]["4096"]["difference"] == -50.0
