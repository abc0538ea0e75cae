"""PNG plot of an eval JSON: the task's metric against the budget, one line per mode and window."""

from __future__ import annotations

import json
import logging
import textwrap
from pathlib import Path

log = logging.getLogger(__name__)
METRICS = {"ppl": [("ppl", "perplexity"), ("exposure", "effective KV exposure")],
           "passkey": [("accuracy", "passkey accuracy")],
           "exposure": [("exposure", "effective KV exposure")]}


def label(row: dict) -> str:
    name = f"retro w={row['window']}" if row["mode"] == "retro" else row["mode"]
    name = f"{name}, sink {row['sink_pages']}" if row.get("sink_pages") else name
    return f"{name}, int8 summaries" if row.get("summaries") == "int8" else name


def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend, or None (logged) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed: no plot")
        return None
    return plt


def grouped_bars(path: Path, groups: list[str], series: dict[str, list[float]], ylabel: str, title: str | None = None,
                 log_scale: bool = False) -> None:
    """A PNG of bars: one group per entry of ``groups``, one bar per series within each group."""
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        ax.bar([x + i * width for x in range(len(groups))], values, width, label=name)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(groups))], groups)
    if log_scale:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot(path: Path) -> Path | None:
    """Write ``path`` with a .png suffix; returns it, or None when matplotlib is not installed."""
    plt = pyplot()
    if plt is None:
        return None
    data = json.loads(Path(path).read_text())
    if data["task"] == "ruler":
        return _plot_by_length(plt, data, path)
    metrics = METRICS[data["task"]]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
    for ax, (key, name) in zip(axes[0], metrics):
        lines: dict[str, list[tuple[int, float]]] = {}
        for row in data["results"]:
            if key not in row:
                continue
            if row["budget"] is None:
                ax.axhline(row[key], color="black", linestyle="--", label=label(row))
            else:
                lines.setdefault(label(row), []).append((row["budget"], row[key]))
        for name_, points in lines.items():
            xs, ys = zip(*sorted(points))
            ax.plot(xs, ys, marker="o", label=name_)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("budget (tokens)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend()
    setup = data["setup"]
    title = f"{data['task']}: {model_name(setup)}, " + (
        f"lengths {setup['lengths']}" if data["task"] == "passkey" else
        f"{setup['passages']} passages x {setup['context']} tokens, {setup['prefill']} prefilled")
    fig.suptitle(textwrap.fill(title, width=60 * len(metrics)), fontsize=9)
    return _save(plt, fig, path)


def _save(plt, fig, path: Path) -> Path:
    """``fig`` as a PNG beside ``path``, closed; returns the PNG's path."""
    fig.tight_layout()
    png = Path(path).with_suffix(".png")
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png


def _plot_by_length(plt, data: dict, path: Path) -> Path:
    """RULER: the average accuracy against the context length, one line per configuration: a
    colour per budget, a line style per mode and window."""
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4.5))
    budgets = sorted({row["budget"] for row in data["results"] if row["budget"] is not None})
    colours = dict(zip(budgets, plt.get_cmap("viridis")(np.linspace(0, 0.9, len(budgets)))))
    for row in data["results"]:
        points = sorted((int(n), v) for n, v in row.get("average", {}).items() if v is not None)
        if not points:
            continue
        name = label(row) + ("" if row["budget"] is None else f", {row['budget']} tokens")
        if row["mode"] == "dense":
            style = dict(color="black", linestyle="--", marker="o")
        else:
            style = dict(color=colours[row["budget"]], marker="s" if row["mode"] == "quest" else "o",
                         linestyle=":" if row["mode"] == "quest" else ("-" if row["window"] > 2 else "-."))
        ax.plot(*zip(*points), label=name, **style)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("RULER average (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    setup = data["setup"]
    ax.set_title(textwrap.fill(f"RULER: {model_name(setup)}, {setup['samples']} samples a task, tasks "
                               f"{', '.join(setup['tasks'])}", width=80), fontsize=8)
    return _save(plt, fig, path)


def model_name(setup: dict) -> str:
    """The model as the title names it: a file or folder by its name, not its full path."""
    return Path(setup["model"]).name
