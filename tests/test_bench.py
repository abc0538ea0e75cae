"""The end-to-end benchmark's CPU smoke run: a tiny Llama through generate(), one process per row."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from retro_compile.bench import main


@pytest.mark.slow
def test_e2e_benchmark_smoke_on_cpu(tmp_path):
    out = tmp_path / "e2e.json"
    argv = ["e2e", "--shape", "smoke", "--device", "cpu", "--batches", "2", "--contexts", "256", "--new-tokens", "6",
            "--runs", "1", "--warmup-tokens", "2", "--warmup-prompt", "40", "--budget", "64",
            "--prefill-tokens", "64", "--modes", "dense", "retro-w2", "--second-process", "--out", str(out)]
    main(argv)
    result = json.loads(out.read_text())
    assert result["meta"]["invocations"] == ["python -m retro_compile.bench " + " ".join(argv)]  # the command given
    rows = {r["mode"]: r for r in result["results"]}
    assert sorted(rows) == ["dense", "retro-w2"]
    for row in rows.values():
        assert "error" not in row, row.get("error")
        assert row["decode_ms"] > 0 and row["ttft_s"] > 0 and row["prompt"] == 256 - 128
        assert row["tokens_per_s"] == 2 * 1000.0 / row["decode_ms"]
        # 2 x 128 prompt tokens > 64: prefilled in chunks of 32, so the warm-up takes two chunks (40 + 32)
        # and compiles everything the timed requests run
        assert row["warmup_prompt"] == 40 + 32 and row["compiles_in_timed_runs"] == 0
    assert rows["retro-w2"]["speedup_vs_dense"] == rows["dense"]["decode_ms"] / rows["retro-w2"]["decode_ms"]
    # warm-up: torch.compile's split by phase (the retro model's prefill and step are Dynamo frames), and a
    # second process's warm-up over the first's compile caches
    assert rows["retro-w2"]["warmup_by_phase_s"]["entire_frame_compile"] > 0
    for row in rows.values():
        assert 0 < row["second_process"]["warmup_s"] and "error" not in row["second_process"]
    assert rows["retro-w2"]["warmup_vs_dense"] == rows["retro-w2"]["warmup_s"] / rows["dense"]["warmup_s"]
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_e2e_benchmark_tensor_parallel_smoke_on_cpu(tmp_path):
    """--tp 2: each configuration runs as two gloo processes over a checkpoint sharded by its tp_plan."""
    out = tmp_path / "e2e_tp.json"
    main(["e2e", "--shape", "smoke", "--device", "cpu", "--tp", "2", "--batches", "1", "--contexts", "256",
          "--new-tokens", "4", "--runs", "1", "--warmup-tokens", "2", "--budget", "64", "--modes", "retro-w2",
          "--timeout", "300", "--out", str(out)])
    data = json.loads(out.read_text())
    (row,) = data["results"]
    assert "error" not in row, row.get("error")
    assert row["tp"] == row["model_tp_size"] == data["meta"]["tp"] == 2 and row["decode_ms"] > 0
    assert row["target_vs_dense"] is None  # the targets are for one GPU


@pytest.mark.slow
def test_a_configuration_out_of_time_is_stopped_with_all_its_processes(tmp_path):
    """A configuration out of time leaves an error row, no figure, and none of its processes behind
    (its launcher's workers would hold the GPUs the next configuration needs)."""
    out = tmp_path / "e2e_timeout.json"
    main(["e2e", "--shape", "smoke", "--device", "cpu", "--tp", "2", "--batches", "1", "--contexts", "256",
          "--modes", "quest", "--timeout", "6", "--out", str(out)])
    (row,) = json.loads(out.read_text())["results"]
    assert row["error"].startswith("timed out after 6 s") and "decode_ms" not in row
    time.sleep(1.0)
    assert not [cmd for cmd in command_lines() if b"retro_compile.bench" in cmd and b"--one" in cmd]


def command_lines() -> list[bytes]:
    lines = []
    for path in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            lines.append(path.read_bytes())
        except OSError:  # ended meanwhile
            pass
    return lines


def test_rows_of_two_budgets_are_two_configurations():
    """An appended sweep replaces a row only with one of the same configuration: a sparse mode at
    another budget is another configuration (a sweep over budgets kept only its last), int8
    summaries are another, and the dense baselines ignore the budget they were given."""
    from retro_compile.bench_e2e import label

    def row(mode, budget, summaries="exact"):
        return dict(mode=mode, budget=budget, summaries=summaries)

    assert len({label(row("retro-w2", b)) for b in (2048, 4096, 8192)}) == 3
    assert label(row("retro-w2", 2048)) != label(row("retro-w2", 2048, "int8"))
    assert label(row("dense", 2048)) == label(row("dense", 8192)) == "dense"
    assert label(row("quest", 2048)) == label(dict(mode="quest")) == "quest"  # rows from before budgets were recorded


@pytest.mark.slow
def test_serve_benchmark_smoke_on_cpu(tmp_path):
    """The served-throughput benchmark at a tiny shape: every configuration answers the same load
    in a process of its own, and each row's figures hang together, its decode profile too."""
    out = tmp_path / "serve.json"
    argv = ["serve", "--shape", "smoke", "--device", "cpu", "--requests", "3", "--min-context", "64",
            "--max-context", "160", "--new-tokens", "12", "--budget", "32", "--page-size", "16", "--batch-tokens", "64",
            "--profile-steps", "2", "--out", str(out)]
    main(argv)
    result = json.loads(out.read_text())
    assert result["meta"]["invocation"] == "python -m retro_compile.bench " + " ".join(argv)
    rows = {r["mode"]: r for r in result["results"]}
    assert sorted(rows) == ["dense", "quest", "retro-w2"]
    for row in rows.values():
        assert "error" not in row, row.get("error")
        assert row["tokens_per_s"] == pytest.approx(3 * 12 / row["wall_s"])
        assert 0 < row["ttft_s"]["median"] <= row["latency_s"]["median"] <= row["wall_s"]
        assert row["positions"] == rows["dense"]["positions"]  # the same load for every configuration
        profile = row["profile"]
        assert 1 <= profile["profiled_steps"] <= 2 and profile["step_wall_ms"] > 0 and profile["step_top_host_ms"]
        # the package's attention runs (inside the manager's own thread) for the sparse modes only
        if row["mode"] == "dense":
            assert profile["step_host_attention_ms"] == 0
        else:
            assert 0 < profile["step_host_attention_ms"] < profile["step_wall_ms"]
            assert any(name == "retro::attention" for name, _, _ in profile["step_top_host_ms"])
    assert rows["retro-w2"]["throughput_vs_dense"] == rows["retro-w2"]["tokens_per_s"] / rows["dense"]["tokens_per_s"]
