"""Draw an experiment's figure from its CSV (written by eval.aggregate), PNG and PDF.

    python -m eval.plots --config C --experiment figure5 --table R/tables/figure5.csv \
        --reference reference/paper_results.yaml --out R/figures/figure5.png R/figures/figure5.pdf

One figure per `measure` of the experiment (xfusion.config.Experiment), laid out by its `plot`
entry in config:
- curves: a panel per metric over training steps, or over tokens seen (`plot.x`: Fig. 5 puts
  FID/CLIP against T2I tokens seen and BLIP against I2T tokens seen); with `plot.facet`, a column
  of panels per value of that setting (Supp. Fig. B: one per model size), metrics down the rows;
- probe: the probe's top-1 per layer, a panel per mode (Supp. Fig. D);
- captions: bars of the caption metrics, ours beside the paper's (Supp. Fig. E);
and the findings scorecard (draw_scorecard, called by eval.findings): a panel per finding.
A line per run: the mean over its training seeds, in a band of the 95 % t-interval of that mean
(the CSV's `<metric>_t95_low/_high`; no band with one seed, and the title says which). Every
label comes from the experiment's own config: a run's legend entry is `plot.labels[run]`, else
`plot.legend` (a format of the run's settings), else the run's overrides that differ between the
experiment's runs (`t2i_ratio=0.5`); entries that would read the same within a panel get their
overrides appended, so two different runs never share one. The paper's finding for the figure is
its subtitle (reference `xfusion.findings`), so a reader compares the trend at a glance.
"""

from __future__ import annotations

import argparse
import string
import textwrap
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import EngFormatter, MaxNLocator  # noqa: E402
import pandas as pd  # noqa: E402

from eval.intervals import interval_columns  # noqa: E402
from xfusion.config import METRICS, Experiment, get_experiment, load_yaml, resolve_run  # noqa: E402
from xfusion.io import atomic_path  # noqa: E402

LABELS = {**{name: m.label for name, m in METRICS.items()}, "step": "training step",
          "layer": "layer", "t2i_tokens_seen": "T2I tokens seen",
          "i2t_tokens_seen": "I2T tokens seen"}


class Legend(string.Formatter):
    """str.format with one addition for flags: `{repa:on/off}` gives "on" or "off"."""

    def format_field(self, value: Any, spec: str) -> str:
        if "/" in spec:
            yes, no = spec.split("/", 1)
            return yes if bool(value) else no
        return super().format_field(value, spec)


def legend_label(fmt: str) -> Callable[[pd.DataFrame], str]:
    """Legend label of a run's rows: `fmt` filled with the columns of its first row."""
    return lambda part: Legend().format(fmt, **part.iloc[0].to_dict())


def by_run(labels: Mapping[str, str]) -> Callable[[pd.DataFrame], str]:
    """Legend label of a run's rows: its entry of `labels` (run_labels)."""
    return lambda part: labels[part.run.iloc[0]]


def override_labels(raw: Mapping[str, Any], exp: Experiment) -> dict[str, str]:
    """Each run's overrides that differ between the experiment's runs, as `key=value` (the key
    without its section; mappings such as a model shape left out); the run's name where none
    differ."""
    def value(config: Mapping[str, Any], dotted: str) -> Any:
        for part in dotted.split("."):
            config = config[part]
        return config

    runs = list(exp.groups)
    keys = dict.fromkeys(k for run in runs for k in (exp.runs[run] or {}))
    resolved = {run: resolve_run(raw, run).to_dict() for run in runs}
    values = {run: {k: value(resolved[run], k) for k in keys} for run in runs}
    differ = [k for k in keys if not isinstance(values[runs[0]][k], Mapping)
              and len({repr(values[run][k]) for run in runs}) > 1]
    return {run: ", ".join(f"{k.split('.', 1)[1]}={values[run][k]}" for k in differ) or run
            for run in runs}


def run_labels(frame: pd.DataFrame, exp: Experiment, raw: Mapping[str, Any]) -> dict[str, str]:
    """Run -> legend entry, from the experiment's own config (module docstring): `plot.labels`,
    else `plot.legend`, else its overrides; within a panel (a facet), equal entries of different
    runs get the runs' overrides appended."""
    own = override_labels(raw, exp)
    fmt = exp.plot.get("legend")
    first = {run: part for run, part in frame.groupby("run", sort=False)}
    labels = {run: exp.plot.get("labels", {}).get(run)
              or (legend_label(fmt)(first[run]) if fmt and run in first else own[run])
              for run in exp.groups}
    facet = exp.plot.get("facet")
    panels = frame.groupby(facet, sort=False).run.unique() if facet else [list(first)]
    for runs in panels:
        seen: dict[str, list[str]] = {}
        for run in runs:
            seen.setdefault(labels[run], []).append(run)
        for same in (named for named in seen.values() if len(named) > 1):
            for run in same:
                labels[run] = f"{labels[run]} ({own[run]})"
    return labels


def x_axis(frame: pd.DataFrame, preferred: str) -> str:
    """Tokens seen where the training log gave them, else the step."""
    return preferred if preferred in frame and frame[preferred].notna().any() else "step"


def draw_lines(ax, frame: pd.DataFrame, x: str, y: str, label: Callable[[pd.DataFrame], str],
               group: str = "run") -> None:
    low, high = interval_columns(y)
    for _, part in frame.groupby(group, sort=False):
        part = part.dropna(subset=[x, y]).sort_values(x)
        if part.empty:
            continue
        (line,) = ax.plot(part[x], part[y], marker="o", label=label(part))
        if {low, high} <= set(part) and part[[low, high]].notna().all(axis=None):
            ax.fill_between(part[x], part[low], part[high], color=line.get_color(), alpha=0.2,
                            linewidth=0)
    ax.set_xlabel(LABELS.get(x, x))
    ax.set_ylabel(LABELS.get(y, y))
    ax.grid(alpha=0.3)
    # Steps and layers are counts (no "2.5" ticks); token counts read as 200k, 1.2M.
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=6))
    if x.endswith("tokens_seen"):
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))


def curves(frame: pd.DataFrame, exp: Experiment, labels: Mapping[str, str]) -> plt.Figure:
    """The experiment's metrics over steps (or tokens seen), a line per run."""
    metrics = [m for m in exp.metrics if m in frame and frame[m].notna().any()]
    facet = exp.plot.get("facet")
    values = list(dict.fromkeys(frame[facet])) if facet else [None]
    shape = (len(metrics), len(values)) if facet else (1, len(metrics))
    fig, axes = plt.subplots(*shape, figsize=(4.2 * shape[1], 3.4 * shape[0]), squeeze=False)
    label = by_run(labels)
    for i, metric in enumerate(metrics):
        for j, value in enumerate(values):
            ax = axes[i][j] if facet else axes[0][i]
            part = frame if value is None else frame[frame[facet] == value]
            draw_lines(ax, part, x_axis(part, exp.plot.get("x", {}).get(metric, "step")), metric,
                       label)
            if facet and i == 0:
                ax.set_title(str(value), fontsize=10)
    axes[0][-1].legend(fontsize=8)
    return fig


def probe(frame: pd.DataFrame, exp: Experiment, labels: Mapping[str, str]) -> plt.Figure:
    """Probe top-1 per layer, a panel per mode (understanding, generation), a line per run."""
    modes = list(dict.fromkeys(frame["mode"])) or ["understanding"]
    fig, axes = plt.subplots(1, len(modes), figsize=(4.6 * len(modes), 3.6), squeeze=False)
    label = by_run(labels)
    for ax, mode in zip(axes[0], modes):
        draw_lines(ax, frame[frame["mode"] == mode], "layer", "probe", label)
        ax.set_title(f"{mode} mode", fontsize=10)
    axes[0][-1].legend(fontsize=8)
    return fig


def captions(frame: pd.DataFrame, exp: Experiment, labels: Mapping[str, str]) -> plt.Figure:
    """Caption metrics of a long vs a short caption, ours beside the paper (Supp. Fig. E)."""
    metrics = list(dict.fromkeys(frame["metric"]))
    fig, axes = plt.subplots(1, max(len(metrics), 1), figsize=(3.6 * max(len(metrics), 1), 3.6),
                             squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        part = frame[frame["metric"] == metric].set_index("caption")[["ours", "paper"]]
        part.astype(float).plot.bar(ax=ax, rot=15, legend=False)
        ax.set_title(metric, fontsize=10)
        ax.set_xlabel("")
        ax.tick_params(axis="x", labelsize=7)
    axes[0][-1].legend(["ours", "paper"], fontsize=8)
    return fig


# One figure per measure of xfusion.config.MEASURES, but `table` (a table is not drawn).
FIGURES: dict[str, Callable[[pd.DataFrame, Experiment, Mapping[str, str]], plt.Figure]] = {
    "curves": curves, "probe": probe, "captions": captions,
}


def seeds_note(exp: Experiment) -> str:
    """What the lines and bands are, in the title."""
    if not exp.groups or exp.measure == "captions":
        return ""
    if exp.seeds == 1:
        return "one training seed per run: no interval"
    return f"mean of {exp.seeds} training seeds per run, band: 95 % t-interval of the mean"


def draw(exp: Experiment, frame: pd.DataFrame, reference: Mapping[str, Any],
         raw: Mapping[str, Any]) -> plt.Figure:
    """The experiment's figure; `raw`: the config that declares it (its runs' overrides)."""
    if exp.measure not in FIGURES:
        raise SystemExit(f"config.experiments.{exp.name}.measure = {exp.measure!r}: a table, "
                         f"not drawn (figures: {', '.join(FIGURES)})")
    paper = reference.get("xfusion", {})
    labels = run_labels(frame, exp, raw) if "run" in frame else {}
    fig = FIGURES[exp.measure](frame, exp, labels)
    finding = paper.get("findings", {}).get(exp.name)
    title = "\n".join(filter(None, [exp.caption or exp.name, seeds_note(exp)]))
    if finding:
        title += "\n" + "\n".join(textwrap.wrap(f"Paper: {finding}", 110))
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


VERDICT_COLOURS = {"reproduced": "tab:green", "contradicted": "tab:red",
                   "inconclusive": "tab:gray"}


def draw_scorecard(frame: pd.DataFrame) -> plt.Figure:
    """The findings scorecard (eval.findings' CSV): a panel per finding, in its metric's units,
    its effect and 95 % interval against zero (and the margin of same / no_better), coloured by
    verdict."""
    fig, axes = plt.subplots(max(len(frame), 1), 1, figsize=(9, 0.75 * max(len(frame), 1) + 0.6),
                             squeeze=False)
    low, high = interval_columns("effect")
    for ax, row in zip(axes[:, 0], frame.itertuples(index=False)):
        colour = VERDICT_COLOURS.get(row.verdict, "tab:gray")
        ax.axvline(0, color="black", linewidth=0.8)
        if pd.notna(row.margin):
            ax.axvspan(-row.margin, row.margin, color="tab:blue", alpha=0.1, linewidth=0)
        if pd.notna(row.effect):
            bounds = [getattr(row, low), getattr(row, high)]
            if all(pd.notna(b) for b in bounds):
                ax.plot(bounds, [0, 0], color=colour, linewidth=3)
            ax.plot([row.effect], [0], "o", color=colour)
        ax.set_yticks([])
        ax.tick_params(axis="x", labelsize=7)
        ax.set_title(f"{row.source}: {row.claim}  [{row.metric}, paper {row.paper_direction}]",
                     fontsize=7, loc="left")
        ax.text(1.01, 0.5, row.verdict, transform=ax.transAxes, color=colour, fontsize=8,
                va="center")
    fig.suptitle("Findings: our effect (a - b) and its 95 % Welch interval over seeds", fontsize=9)
    fig.tight_layout()
    return fig


def save(fig: plt.Figure, outputs: Sequence[str | Path]) -> None:
    """Write each output atomically, its format from its suffix (png, pdf)."""
    for out in map(Path, outputs):
        with atomic_path(out) as tmp:
            fig.savefig(tmp, format=out.suffix.lstrip("."), dpi=150)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="config/<scale>.yaml (its experiments)")
    p.add_argument("--experiment", required=True, help="a key of config.experiments")
    p.add_argument("--table", required=True, help="R/tables/<experiment>.csv")
    p.add_argument("--reference", required=True, help="reference/paper_results.yaml")
    p.add_argument("--out", nargs="+", required=True, help="R/figures/<experiment>.{png,pdf}")
    args = p.parse_args(argv)
    raw = load_yaml(args.config)
    exp = get_experiment(raw, args.experiment)
    save(draw(exp, pd.read_csv(args.table), load_yaml(args.reference), raw), args.out)


if __name__ == "__main__":
    main()
