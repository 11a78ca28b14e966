"""Tables and plots of a sweep: per setting, mean ± standard deviation over seeds, from the runs' own numbers.

Rows come from `hf_l2.tools.sweep.run_sweep`: one per run, with `setting`, `mode`, `coef`, `seed`, `drift` and the
recipe's `eval_*` metrics. A missing or non-finite number is an error, never a blank or a made-up cell.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

# Metrics a recipe may report, in table order: name in `eval_<name>` → (label, higher is better).
HEADLINE = {"perplexity": ("perplexity", False), "bleu": ("BLEU", True), "chrf": ("chrF", True)}
# The metric the one-sentence summary compares methods by: the first of these the runs have.
SUMMARY_METRICS = ("bleu", "perplexity", "loss")
# Forgetting the summary allows: this fraction of what fine-tuning without a penalty forgets.
FORGETTING_BUDGET = 0.5
COLORS = {"none": "black", "l2": "tab:orange", "l2_sp": "tab:blue", "l2_sp_fisher": "tab:green",
          "kl": "tab:red", "asft": "tab:pink", "wise_ft": "tab:purple", "start": "tab:gray"}
EXTRA_COLORS = ("tab:brown", "tab:olive", "tab:cyan", "gold")
# The name of each method's strength on the plot (α unless a method says otherwise).
STRENGTH = {"l2": "α", "l2_sp": "α", "l2_sp_fisher": "α", "kl": "λ", "asft": "λ", "wise_ft": "t"}
# Methods whose strength grows toward the starting model (WiSE-FT's t: 0 is θ₀, 1 the unpenalized run).
TOWARD_FINE_TUNED = ("wise_ft",)


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
                raise SweepResultError(
                    f"Run {row['setting']!r} seed {row['seed']}: `{column}` is {value!r}, not a number.")
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


def method_colors(summaries: list[Summary]) -> dict[str, str]:
    """A color per mode: the fixed ones, then the next free color for each mode without one."""
    colors = dict(COLORS)
    extra = iter(EXTRA_COLORS)
    for s in summaries:
        colors.setdefault(s.mode, next(extra, "tab:gray"))
    return colors


def methods(summaries: list[Summary]) -> dict[str, list[Summary]]:
    """Each penalized method's settings, weakest first (`start` and `none` are not methods)."""
    grouped: dict[str, list[Summary]] = {}
    for s in summaries:
        if s.mode not in ("start", "none"):
            grouped.setdefault(s.mode, []).append(s)
    return {mode: sorted(points, key=lambda s: s.coef) for mode, points in grouped.items()}


def plot(summaries: list[Summary], path: str | Path, title: str) -> None:
    """One frontier panel per headline metric, and drift against α.

    A frontier panel puts the target-domain metric against the pretraining-domain one (against drift when the
    runs have no pretraining-domain numbers): the starting model is a star, no penalty a black point, and each
    method a curve over its strength, from no penalty (strength 0) to its strongest setting (WiSE-FT: from the
    starting model, t = 0, to no penalty, t = 1), with error bars over seeds. One more method is one more curve.
    """
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
    colors = method_colors(summaries)
    fixed = {s.mode: s for s in summaries if s.mode in ("start", "none")}
    for ax, target in zip(axes, targets):
        x_column = target.replace("eval_", "eval_pretrain_", 1)
        x_column = x_column if x_column in wanted else "drift"

        def point(s: Summary, x_column=x_column, target=target) -> tuple[float, float, float, float]:
            return s.mean(x_column), s.mean(target), s.std(x_column), s.std(target)

        for mode, s in fixed.items():
            x, y, dx, dy = point(s)
            ax.errorbar(x, y, xerr=dx, yerr=dy, fmt="*" if mode == "start" else "o", capsize=3, zorder=3,
                        markersize=13 if mode == "start" else 7, color=colors[mode],
                        label="starting model" if mode == "start" else "no penalty")
        for mode, points in methods(summaries).items():
            ends = [fixed[m] for m in ("start", "none") if m in fixed and (m == "none" or mode in TOWARD_FINE_TUNED)]
            curve = ends[:1] + points + ends[1:] if mode in TOWARD_FINE_TUNED else ends + points
            xs, ys, dxs, dys = zip(*map(point, curve))
            ax.errorbar(xs, ys, xerr=dxs, yerr=dys, fmt="o-", capsize=3, markersize=5, color=colors[mode],
                        label=mode)
            for s in points:
                ax.annotate(f"{STRENGTH.get(mode, 'strength')}={s.coef:g}", (s.mean(x_column), s.mean(target)),
                            textcoords="offset points", xytext=(5, 4), fontsize=7, color=colors[mode])
        ax.set_xlabel(column_label(x_column) + (" (held-out pretraining data)" if x_column != "drift" else ""))
        ax.set_ylabel(column_label(target) + " (held-out fine-tuning data)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    _plot_drift(axes[panels - 1], summaries, colors)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)


@dataclass
class Budget:
    """The forgetting budget of a sweep and, per method, its best setting within it (best first)."""

    metric: str  # the compared metric's name (`bleu`, `perplexity`, `loss`)
    label: str
    higher: bool
    start: float  # the starting model's pretraining-domain value
    none: float  # the unpenalized runs' mean
    limit: float  # the least good pretraining-domain value allowed
    best: list[Summary]  # each method's best qualifying setting, best target first


def forgetting_budget(summaries: list[Summary], budget: float = FORGETTING_BUDGET) -> Budget | str | None:
    """Within a forgetting budget, each method's best setting by target metric. The budget is a fraction of what
    fine-tuning without a penalty forgets: the pretraining-domain metric may move from the starting model's toward
    the unpenalized model's by at most `budget` of the way. A sentence instead when nothing was forgotten; None
    when the runs cannot say (no start, no unpenalized run or no pretraining-domain numbers)."""
    wanted = summaries[0].values
    metric = next((m for m in SUMMARY_METRICS if f"eval_{m}" in wanted and f"eval_pretrain_{m}" in wanted), None)
    fixed = {s.mode: s for s in summaries if s.mode in ("start", "none")}
    if metric is None or len(fixed) < 2:
        return None
    target, pretrain = f"eval_{metric}", f"eval_pretrain_{metric}"
    label, higher = HEADLINE.get(metric, (metric, False))
    sign = 1 if higher else -1  # sign * value: larger is better
    start, none = fixed["start"].mean(pretrain), fixed["none"].mean(pretrain)
    forgotten = sign * (start - none)
    if forgotten <= 0:
        worsen = "lower" if higher else "raise"  # forgetting lowers BLEU and raises perplexity
        return (f"Fine-tuning without a penalty did not {worsen} the pretraining-domain {label} ({start:.2f} → "
                f"{none:.2f}): there is no forgetting to budget here.")
    limit = start - sign * budget * forgotten
    best: dict[str, Summary] = {}
    for s in summaries:
        if s.mode in ("start", "none") or sign * (s.mean(pretrain) - limit) < 0:
            continue
        if s.mode not in best or sign * (s.mean(target) - best[s.mode].mean(target)) > 0:
            best[s.mode] = s
    ranked = sorted(best.values(), key=lambda s: -sign * s.mean(target))
    return Budget(metric, label, higher, start, none, limit, ranked)


def frontier_summary(summaries: list[Summary], budget: float = FORGETTING_BUDGET) -> str | None:
    """One sentence: within a forgetting budget (see `forgetting_budget`), which method gives the best target
    metric, by how much, and whether that gap is beyond the seeds' spread."""
    found = forgetting_budget(summaries, budget)
    if not isinstance(found, Budget):
        return found
    target, label, sign = f"eval_{found.metric}", found.label, 1 if found.higher else -1
    reference = next(s for s in summaries if s.mode == "none")
    budget_text = (f"At a forgetting budget of {budget:.0%} of what fine-tuning without a penalty forgets "
                   f"(pretraining {label} {'≥' if found.higher else '≤'} {found.limit:.2f}; start {found.start:.2f}, "
                   f"no penalty {found.none:.2f})")

    def cell(s: Summary) -> str:
        return f"{s.setting} ({_format(s.mean(target), s.std(target), s.runs)})"

    ranked = found.best
    if not ranked:
        return f"{budget_text}, no setting qualifies."
    first = ranked[0]
    cost = (f"; no penalty reaches {_format(reference.mean(target), reference.std(target), reference.runs)} "
            "while forgetting more")
    if len(ranked) == 1:
        return f"{budget_text}, only {first.mode} qualifies: {cell(first)} gives the best target {label}{cost}."
    second = ranked[1]
    gap = sign * (first.mean(target) - second.mean(target))
    spread = first.std(target) + second.std(target)
    verdict = "beyond" if gap > spread else "within"
    return (f"{budget_text}, {cell(first)} gives the best target {label}, {gap:.2f} better than the best of "
            f"{second.mode}, {cell(second)}: {verdict} the seeds' spread ({spread:.2f}, the two standard deviations "
            f"added){cost}.")


def budget_table(summaries: list[Summary], budget: float = FORGETTING_BUDGET) -> str | None:
    """Markdown: each method's best setting within the forgetting budget, best target first (None without one)."""
    found = forgetting_budget(summaries, budget)
    if not isinstance(found, Budget) or not found.best:
        return None
    target, pretrain = f"eval_{found.metric}", f"eval_pretrain_{found.metric}"
    arrow = "↑" if found.higher else "↓"
    lines = [(f"| method | best setting within the budget | target {found.label} {arrow} | "
             f"pretraining {found.label} {arrow} |"), "|---|---|---:|---:|"]
    for s in found.best:
        lines.append(f"| {s.mode} | {s.setting} | {_format(s.mean(target), s.std(target), s.runs)} | "
                     f"{_format(s.mean(pretrain), s.std(pretrain), s.runs)} |")
    return "\n".join(lines) + "\n"


def _plot_drift(ax, summaries: list[Summary], colors: dict[str, str]) -> None:
    penalized = [s for s in summaries if s.mode not in ("start", "none")]
    coefs = sorted({s.coef for s in penalized})
    for mode in dict.fromkeys(s.mode for s in penalized):
        points = sorted((s for s in penalized if s.mode == mode), key=lambda s: s.coef)
        ax.errorbar([s.coef for s in points], [s.mean("drift") for s in points],
                    yerr=[s.std("drift") for s in points], marker="o", capsize=3, label=mode, color=colors[mode])
    for s in summaries:
        if s.mode == "none":
            ax.axhline(s.mean("drift"), color=colors["none"], linestyle="--", label="none")
            ax.axhspan(s.mean("drift") - s.std("drift"), s.mean("drift") + s.std("drift"), color="black", alpha=0.08)
    positive = [c for c in coefs if c > 0]
    if positive and coefs[0] == 0:  # α = 0 has no place on a log axis
        ax.set_xscale("symlog", linthresh=positive[0])
    elif positive:
        ax.set_xscale("log")
    ax.set_xlabel("strength (l2_coef: α; l2_kl_coef: λ; WiSE-FT: t)")
    ax.set_ylabel(column_label("drift") + " from the starting model")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def write_report(rows: list[dict], output_dir: str | Path, title: str) -> tuple[Path, Path]:
    """`results.md` (title, table, the frontier's one-sentence summary and each method's best setting within the
    forgetting budget) and `results.png` under `output_dir`; returns their paths."""
    summaries = summarize(rows)
    output_dir = Path(output_dir)
    table, figure = output_dir / "results.md", output_dir / "results.png"
    plot(summaries, figure, title)
    summary = frontier_summary(summaries)
    ranking = budget_table(summaries)
    table.write_text(f"### {title}\n\n{markdown_table(summaries)}" + (f"\n{summary}\n" if summary else "")
                     + (f"\n{ranking}" if ranking else ""), encoding="utf-8")
    return table, figure
