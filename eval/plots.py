"""Draw an experiment's figure from its CSV (written by eval.aggregate), PNG and PDF.

    python -m eval.plots --config C --experiment figure5 --table results/figure5.csv \
        --reference reference/paper_results.yaml --out results/figures/figure5.png results/figures/figure5.pdf

Each figure follows the paper's layout where it has one: Fig. 5 puts FID/CLIP against T2I tokens
seen and BLIP against I2T tokens seen; Fig. 6 and 8 put the metrics over training steps;
Supp. Fig. B has one column per model size with alignment on/off; Supp. Fig. D the probe accuracy
per layer in understanding and generation modes; Supp. Fig. E the caption metrics of a long and a
short caption, the paper's numbers beside ours. The paper's finding for the figure is its
subtitle (reference `xfusion.findings`), so a reader compares the trend at a glance.
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import EngFormatter, MaxNLocator  # noqa: E402
import pandas as pd  # noqa: E402

from eval.aggregate import ATTRIBUTE_METRICS  # noqa: E402
from xfusion.config import experiments_from_dict, load_yaml  # noqa: E402
from xfusion.io import atomic_path  # noqa: E402

LABELS = {"fid": "FID (lower is better)", "clip": "CLIP score", "blip": "BLIP (ITM) score",
          "accuracy": "probe top-1 (%)", "step": "training step",
          "t2i_tokens_seen": "T2I tokens seen", "i2t_tokens_seen": "I2T tokens seen",
          "t2i_attr_acc": "T2I attribute accuracy (%)",
          "i2t_attr_recall": "I2T attribute recall (%)"}
METRICS = ("fid", "clip", "blip")  # one panel each; ATTRIBUTE_METRICS too where the CSV has them


def x_axis(frame: pd.DataFrame, preferred: str) -> str:
    """Tokens seen where the training log gave them, else the step."""
    return preferred if preferred in frame and frame[preferred].notna().any() else "step"


def draw_lines(ax, frame: pd.DataFrame, x: str, y: str, group: str,
               label: Callable[[pd.DataFrame], str]) -> None:
    for _, part in frame.groupby(group, sort=False):
        part = part.dropna(subset=[x, y]).sort_values(x)
        if not part.empty:
            ax.plot(part[x], part[y], marker="o", label=label(part))
    ax.set_xlabel(LABELS.get(x, x))
    ax.set_ylabel(LABELS.get(y, y))
    ax.grid(alpha=0.3)
    # Steps and layers are counts (no "2.5" ticks); token counts read as 200k, 1.2M.
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=6))
    if x.endswith("tokens_seen"):
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))


def run_label(key: str | None = None, fmt: str = "{}") -> Callable[[pd.DataFrame], str]:
    """Legend label: the run name, or a setting of the run formatted with `fmt`."""
    return lambda part: fmt.format(part[key].iloc[0]) if key else str(part["run"].iloc[0])


def metric_row(frame: pd.DataFrame, x_for: Mapping[str, str], label) -> plt.Figure:
    metrics = [*METRICS, *(m for m in ATTRIBUTE_METRICS if m in frame and frame[m].notna().any())]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        draw_lines(ax, frame, x_axis(frame, x_for.get(metric, "step")), metric, "run", label)
    axes[0][-1].legend(fontsize=8)
    return fig


def figure5(frame: pd.DataFrame, paper: Mapping[str, Any]) -> plt.Figure:
    """T2I metrics against T2I tokens seen, BLIP against I2T tokens seen (X-Fusion Fig. 5)."""
    pct = lambda part: f"T2I:I2T = {100 * part['t2i_ratio'].iloc[0]:.0f}:{100 - 100 * part['t2i_ratio'].iloc[0]:.0f}"
    return metric_row(frame, {"fid": "t2i_tokens_seen", "clip": "t2i_tokens_seen",
                              "blip": "i2t_tokens_seen", "t2i_attr_acc": "t2i_tokens_seen",
                              "i2t_attr_recall": "i2t_tokens_seen"}, pct)


def figure6(frame: pd.DataFrame, paper: Mapping[str, Any]) -> plt.Figure:
    """Metrics over steps per I2T noise limit (X-Fusion Fig. 6)."""
    return metric_row(frame, {}, lambda p: f"I2T noise <= {100 * p['i2t_noise_max'].iloc[0]:.0f}%")


def figure8(frame: pd.DataFrame, paper: Mapping[str, Any]) -> plt.Figure:
    """Dual Tower vs X-Fuse over steps (X-Fusion Fig. 8)."""
    return metric_row(frame, {}, run_label("architecture"))


def figure_b(frame: pd.DataFrame, paper: Mapping[str, Any]) -> plt.Figure:
    """One column per model size, alignment on/off over steps (X-Fusion Supp. Fig. B)."""
    sizes = list(dict.fromkeys(frame["base_lm"]))
    rows = ("fid", "blip")
    fig, axes = plt.subplots(len(rows), max(len(sizes), 1), figsize=(4.2 * max(len(sizes), 1), 6.4),
                             squeeze=False)
    for j, size in enumerate(sizes):
        part = frame[frame["base_lm"] == size]
        for i, metric in enumerate(rows):
            draw_lines(axes[i][j], part, "step", metric, "repa",
                       lambda p: "alignment on" if bool(p["repa"].iloc[0]) else "alignment off")
            axes[i][j].set_title(size if i == 0 else "", fontsize=10)
    axes[0][-1].legend(fontsize=8)
    return fig


def figure_d(frame: pd.DataFrame, paper: Mapping[str, Any]) -> plt.Figure:
    """Probe accuracy per layer, understanding and generation modes (X-Fusion Supp. Fig. D)."""
    modes = list(dict.fromkeys(frame["mode"])) or ["understanding"]
    fig, axes = plt.subplots(1, len(modes), figsize=(4.6 * len(modes), 3.6), squeeze=False)
    noise = lambda p: ("clean I2T images" if p["i2t_noise_max"].iloc[0] == 0
                       else f"noisy I2T (t <= {p['i2t_noise_max'].iloc[0]:g})")
    for ax, mode in zip(axes[0], modes):
        draw_lines(ax, frame[frame["mode"] == mode], "layer", "accuracy", "run", noise)
        ax.set_xlabel("layer")
        ax.set_title(f"{mode} mode", fontsize=10)
    axes[0][-1].legend(fontsize=8)
    return fig


def figure_e(frame: pd.DataFrame, paper: Mapping[str, Any]) -> plt.Figure:
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


FIGURES: dict[str, Callable[[pd.DataFrame, Mapping[str, Any]], plt.Figure]] = {
    "figure5": figure5, "figure6": figure6, "figure8": figure8, "figureB": figure_b,
    "figureD": figure_d, "figureE": figure_e,
}


def draw(experiment: str, frame: pd.DataFrame, reference: Mapping[str, Any],
         caption: str = "") -> plt.Figure:
    paper = reference.get("xfusion", {})
    fig = FIGURES.get(experiment, figure6)(frame, paper)
    finding = paper.get("findings", {}).get(experiment)
    title = caption or experiment
    if finding:
        title += "\n" + "\n".join(textwrap.wrap(f"Paper: {finding}", 110))
    fig.suptitle(title, fontsize=9)
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
    p.add_argument("--config", required=True, help="config/<scale>.yaml (figure captions)")
    p.add_argument("--experiment", required=True)
    p.add_argument("--table", required=True, help="results/<experiment>.csv")
    p.add_argument("--reference", required=True, help="reference/paper_results.yaml")
    p.add_argument("--out", nargs="+", required=True, help="results/figures/<experiment>.{png,pdf}")
    args = p.parse_args(argv)
    exps = experiments_from_dict(load_yaml(args.config))
    caption = exps[args.experiment].caption if args.experiment in exps else ""
    frame = pd.read_csv(args.table)
    save(draw(args.experiment, frame, load_yaml(args.reference), caption), args.out)


if __name__ == "__main__":
    main()
