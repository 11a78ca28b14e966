"""Tables and plots of a sweep: per setting, mean ± standard deviation over seeds, from the runs' own numbers.

Rows come from `hf_l2.sweep.run_sweep`: one per run, with `setting`, `mode`, `coef`, `seed`, `drift` and the
recipe's `eval_*` metrics. A missing or non-finite number is an error, never a blank or a made-up cell.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

# Metrics a recipe may report, in table order: name in `eval_<name>` → (label, higher is better).
HEADLINE = {"perplexity": ("perplexity", False), "bleu": ("BLEU", True), "chrf": ("chrF", True)}
COLORS = {"none": "black", "l2": "tab:orange", "l2_sp": "tab:blue", "kl": "tab:green", "start": "tab:gray"}


class SweepResultError(ValueError):
    """A run's numbers cannot be reported (missing or not finite); the message names the run."""


@dataclass
class Summary:
    """One setting's numbers over its seeds: `values[column]` is the list of per-seed values."""

    setting: str
    mode: str
    coef: float
    values: dict[str, list[float]] = field(default_factory=dict)

    def mean(self, column: str) -> float:
        return statistics.fmean(self.values[column])

    def std(self, column: str) -> float:
        """Sample standard deviation over seeds (0 for a single run)."""
        values = self.values[column]
        return statistics.stdev(values) if len(values) > 1 else 0.0

    @property
    def runs(self) -> int:
        return len(self.values["drift"])


def columns(first: dict) -> list[str]:
    """Reported columns, decided by the first run: its headline metrics (`loss` when it has none of `HEADLINE`),
    the same on the pretraining domain when it has them, and drift. Every other run must have them all."""
    metrics = [m for m in HEADLINE if f"eval_{m}" in first] or ["loss"]
    pretrain = [f"eval_pretrain_{m}" for m in metrics]
    return [f"eval_{m}" for m in metrics] + (pretrain if all(k in first for k in pretrain) else []) + ["drift"]


def summarize(rows: list[dict]) -> list[Summary]:
    """Group runs by setting (in the order they ran) and check every reported number is there and finite."""
    wanted = columns(rows[0])
    groups: dict[str, Summary] = {}
    for row in rows:
        group = groups.setdefault(row["setting"], Summary(row["setting"], row["mode"], row["coef"]))
        for column in wanted:
            value = row.get(column)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise SweepResultError(f"Run {row['setting']!r} seed {row['seed']}: `{column}` is {value!r}, not a number.")
            group.values.setdefault(column, []).append(float(value))
    return list(groups.values())


def column_label(column: str) -> str:
    if column == "drift":
        return "drift ‖θ−θ₀‖"
    pretrain = column.startswith("eval_pretrain_")
    name = column.removeprefix("eval_pretrain_" if pretrain else "eval_")
    label, higher = HEADLINE.get(name, (name, False))
    return f"{'pretraining' if pretrain else 'target'} {label} {'↑' if higher else '↓'}"


def _format(mean: float, std: float, runs: int) -> str:
    digits = 1 if abs(mean) >= 100 else 2
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if runs > 1 else "")


def markdown_table(summaries: list[Summary]) -> str:
    wanted = list(summaries[0].values)
    lines = [
        "| setting | runs | " + " | ".join(column_label(c) for c in wanted) + " |",
        "|---|---:|" + "---:|" * len(wanted),
    ]
    for s in summaries:
        cells = [_format(s.mean(c), s.std(c), s.runs) for c in wanted]
        lines.append(f"| {s.setting} | {s.runs} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(summaries: list[Summary], path: str | Path, title: str) -> None:
    """One panel per headline metric (target domain against pretraining domain, or against drift when the runs
    have no pretraining-domain numbers), and drift against α."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    wanted = list(summaries[0].values)
    targets = [c for c in wanted if c.startswith("eval_") and not c.startswith("eval_pretrain_")]
    panels = len(targets) + 1
    cols = panels if panels <= 3 else 2
    rows = math.ceil(panels / cols)
    fig = Figure(figsize=(5 * cols, 4.4 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[panels:]:
        ax.set_visible(False)
    for ax, target in zip(axes, targets):
        x_column = target.replace("eval_", "eval_pretrain_", 1)
        x_column = x_column if x_column in wanted else "drift"
        for s in summaries:
            ax.errorbar(s.mean(x_column), s.mean(target), xerr=s.std(x_column), yerr=s.std(target),
                        fmt="*" if s.mode == "start" else "o", markersize=11 if s.mode == "start" else 6,
                        color=COLORS[s.mode], capsize=3)
            name = s.mode if s.mode in ("start", "none") else f"{'λ' if s.mode == 'kl' else 'α'}={s.coef:g}"
            ax.annotate(name, (s.mean(x_column), s.mean(target)), textcoords="offset points", xytext=(5, 4),
                        fontsize=8, color=COLORS[s.mode])
        ax.set_xlabel(column_label(x_column) + (" (held-out pretraining data)" if x_column != "drift" else ""))
        ax.set_ylabel(column_label(target) + " (held-out fine-tuning data)")
        ax.grid(alpha=0.3)
    _plot_drift(axes[panels - 1], summaries)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)


def _plot_drift(ax, summaries: list[Summary]) -> None:
    penalized = [s for s in summaries if s.mode not in ("start", "none")]
    coefs = sorted({s.coef for s in penalized})
    for mode in dict.fromkeys(s.mode for s in penalized):
        points = sorted((s for s in penalized if s.mode == mode), key=lambda s: s.coef)
        ax.errorbar([s.coef for s in points], [s.mean("drift") for s in points],
                    yerr=[s.std("drift") for s in points], marker="o", capsize=3, label=mode, color=COLORS[mode])
    for s in summaries:
        if s.mode == "none":
            ax.axhline(s.mean("drift"), color=COLORS["none"], linestyle="--", label="none")
            ax.axhspan(s.mean("drift") - s.std("drift"), s.mean("drift") + s.std("drift"), color="black", alpha=0.08)
    positive = [c for c in coefs if c > 0]
    if positive and coefs[0] == 0:  # α = 0 has no place on a log axis
        ax.set_xscale("symlog", linthresh=positive[0])
    elif positive:
        ax.set_xscale("log")
    ax.set_xlabel("α (l2_coef); λ (l2_kl_coef) for kl")
    ax.set_ylabel(column_label("drift") + " from the starting model")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def write_report(rows: list[dict], output_dir: str | Path, title: str) -> tuple[Path, Path]:
    """`results.md` (title and table) and `results.png` under `output_dir`; returns their paths."""
    summaries = summarize(rows)
    output_dir = Path(output_dir)
    table, figure = output_dir / "results.md", output_dir / "results.png"
    plot(summaries, figure, title)
    table.write_text(f"### {title}\n\n{markdown_table(summaries)}", encoding="utf-8")
    return table, figure
