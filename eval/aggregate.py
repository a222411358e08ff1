"""Collect an experiment's metric JSONs into one CSV, ours beside the published numbers.

    python -m eval.aggregate --config C --experiment table1 --reference reference/paper_results.yaml \
        --metrics R/metrics/RUN/STEP/{mmlu,fid,clip,blip}.json … [--base NAME=R/metrics/base/NAME/mmlu.json …] \
        [--train-logs RUN=R/runs/RUN/train_log.jsonl …] [--caption-metrics R/metrics/caption_metrics.json] \
        --out R/tables/table1.csv

What an experiment measures and which columns it gets is declared in config (`experiments:`,
xfusion.config.Experiment); this module keeps one builder per `measure`:
- table: a row per run (and per base LLM with `base`): its settings, its metrics at the last
  measured step, `<metric>_change` against its base LLM, and the paper's numbers, as paper_*
  columns (the paper's row of the run's name, else of its architecture) or as rows above ours;
  with `per_seed`, each seed replicate's row (column `run`: its run name) above its run's;
- curves: a row per (run, step): metrics, settings, T2I/I2T tokens seen (`tokens_seen`);
- probe: a row per (run, step, mode, layer): the linear probe's top-1 (%) in column `probe`;
- captions: a row per (caption, metric) of Supp. Fig. E, ours beside the paper's.
A run is measured once per training seed (its replicates `<run>_seed<k>`, experiments.<name>.seeds):
its row gives `n_seeds`, each metric's mean over them in the metric's column and the 95 % Student
t-interval of that mean in `<metric>_t95_low`, `<metric>_t95_high` (eval.intervals), empty with one
seed. The base LLM is pretrained once: its rows have no interval.
Metric files follow docs/INTERFACES.md (`{"metric", "value", "run", "step", "n", "details"}`) at
`R/metrics/RUN/STEP/<metric>.json`, the metric one name of xfusion.config.METRICS in both the
file name and the JSON; the path gives run and step where the JSON leaves them null. Percentages
(MMLU, probe, the attribute metrics) are fractions in the JSON; CLIP and BLIP are already x100.
The figure code (eval.plots) reads these CSVs only.
"""

from __future__ import annotations

import argparse
import json
from functools import reduce
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import pandas as pd

from eval.intervals import interval_columns, mean_interval
from xfusion.config import ARCHITECTURES, METRICS, get_experiment, load_yaml, resolve_run
from xfusion.io import atomic_path, read_jsonl


def read_metrics(paths: Sequence[str | Path]) -> pd.DataFrame:
    """One row per metric file: run, step, metric (a METRICS name), value, details."""
    rows = []
    for path in map(Path, paths):
        record = json.loads(path.read_text())
        name = path.stem
        if name not in METRICS:
            raise SystemExit(f"{path}: unknown metric file name (expected one of {', '.join(METRICS)})")
        if record.get("metric") != name:
            raise SystemExit(f"{path}: its JSON says metric {record.get('metric')!r}; a metric has "
                             f"one name (xfusion.config.METRICS) in its file and its JSON")
        value = float(record["value"]) * (100.0 if METRICS[name].percent else 1.0)
        rows.append({"run": record.get("run") or path.parent.parent.name,
                     "step": int(record["step"] if record.get("step") is not None else path.parent.name),
                     "metric": name, "value": value, "details": record.get("details") or {}})
    return pd.DataFrame(rows, columns=["run", "step", "metric", "value", "details"])


def final_values(metrics: pd.DataFrame, run: str) -> dict[str, float]:
    """The run's metrics at its last measured step."""
    mine = metrics[metrics.run == run]
    if mine.empty:
        return {}
    last = mine[mine.step == mine.step.max()]
    return dict(zip(last.metric, last.value))


def read_base(pairs: Sequence[str]) -> dict[str, float]:
    """`NAME=path` -> {NAME: MMLU in percent}."""
    out = {}
    for name, path in (p.split("=", 1) for p in pairs):
        out[name] = 100.0 * float(json.loads(Path(path).read_text())["value"])
    return out


def tokens_seen(pairs: Sequence[str]) -> pd.DataFrame:
    """T2I/I2T tokens seen per logged step, from `RUN=R/runs/RUN/train_log.jsonl`."""
    frames = []
    for run, path in (p.split("=", 1) for p in pairs):
        log = pd.DataFrame(read_jsonl(path))
        cols = ["step", "t2i_tokens_seen", "i2t_tokens_seen"]
        frames.append(log.reindex(columns=cols).assign(run=run))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


class Context:
    """What every builder needs: the experiment, its runs (resolved), metrics and reference."""

    def __init__(self, raw: Mapping[str, Any], experiment: str, reference: Mapping[str, Any],
                 metrics: pd.DataFrame, base: dict[str, float], logs: pd.DataFrame,
                 caption_metrics: list[dict]):
        self.experiment = get_experiment(raw, experiment)
        self.runs = {name: resolve_run(raw, name) for name in self.experiment.runs}
        strangers = sorted(set(metrics.run) - set(self.runs))
        if strangers:
            raise SystemExit(f"metric files of {', '.join(strangers)}: not runs of "
                             f"config.experiments.{experiment}")
        self.paper = reference.get("xfusion", {})
        self.metrics, self.base, self.logs = metrics, base, logs
        self.caption_metrics = caption_metrics

    def settings(self, run: str) -> dict[str, Any]:
        """The run's values of the experiment's `settings` (column -> dotted config key)."""
        values = self.runs[run].to_dict()
        return {column: reduce(lambda node, key: node[key], dotted.split("."), values)
                for column, dotted in self.experiment.settings.items()}

    def group_settings(self, group: str) -> dict[str, Any]:
        """The settings of a run's seed replicates where they agree (a setting that differs
        between its seeds, e.g. training.seed, is left empty on the run's row)."""
        each = [self.settings(r) for r in self.experiment.groups[group]]
        return {k: v if all(s[k] == v for s in each) else None for k, v in each[0].items()}

    def group_of(self) -> dict[str, str]:
        """Seed replicate -> its run."""
        return {r: g for g, members in self.experiment.groups.items() for r in members}

    def paper_rows(self) -> dict[str, dict[str, Any]]:
        """The published rows of the experiment's reference table, in our column names."""
        ref = self.experiment.paper
        if ref is None:
            return {}
        if ref.table not in self.paper:
            raise SystemExit(f"config.experiments.{self.experiment.name}.paper.table = "
                             f"{ref.table!r}: not a table of the reference's `xfusion` section")
        return {name: {ref.names.get(k, k): v for k, v in values.items()}
                for name, values in self.paper[ref.table].get("rows", {}).items()}


def with_intervals(columns: Sequence[str]) -> list[str]:
    """Each column followed by its interval columns."""
    return [c for col in columns for c in (col, *interval_columns(col))]


def over_seeds(frame: pd.DataFrame, keys: list[str], columns: Sequence[str]) -> pd.DataFrame:
    """One row per `keys` (a run's seed replicates, `run`, pooled): `n_seeds` and each column's
    mean over the seeds with its 95 % t-interval (eval.intervals)."""
    rows = []
    for key, part in frame.groupby(keys, sort=False):
        row = {**dict(zip(keys, key)), "n_seeds": part["run"].nunique()}
        for column in columns:
            mean, low, high, _ = mean_interval(part[column]) if column in part else (None,) * 4
            row.update(zip((column, *interval_columns(column)), (mean, low, high)))
        rows.append(row)
    return pd.DataFrame(rows, columns=[*keys, "n_seeds", *with_intervals(columns)])


def table(ctx: Context) -> pd.DataFrame:
    """Published rows (layout: rows), base LLM rows (`base`), then one row per run (its mean
    over seeds; with `per_seed`, each seed's row above it)."""
    e = ctx.experiment
    paper = ctx.paper_rows()
    as_rows = e.paper is not None and e.paper.layout == "rows"
    beside = [] if as_rows else [m for m in e.metrics if any(m in r for r in paper.values())]
    llm = next((v for k, v in paper.items() if k not in ARCHITECTURES), {})  # the base LLM's row
    changes = [f"{m}_change" for m in e.changes]
    seeds = []  # one row per seed replicate: its final metrics and changes
    for group, members in e.groups.items():
        base = ctx.base.get(ctx.runs[group].model.base_lm.name)
        for name in members:
            ours = final_values(ctx.metrics, name)
            seeds.append({"variant": group, "run": name, **{m: ours.get(m) for m in e.metrics},
                          **{f"{m}_change": None if ours.get(m) is None or base is None
                             else ours[m] - base for m in e.changes}})
    seeds = pd.DataFrame(seeds, columns=["variant", "run", *e.metrics, *changes])
    means = over_seeds(seeds, ["variant"], [*e.metrics, *changes]).set_index("variant")
    rows = [{"variant": name, "source": "paper", **values} for name, values in paper.items()
            if as_rows]
    if e.base:
        rows += [{"variant": name, "source": "ours", "mmlu": value,
                  **{f"paper_{m}": llm.get(m) for m in beside}} for name, value in ctx.base.items()]
    for group in e.groups:
        run = ctx.runs[group]
        published = paper.get(group) or paper.get(run.model.architecture) or {}
        if e.per_seed:
            rows += [{"source": "ours", **ctx.settings(r.run), "n_seeds": 1, **r._asdict()}
                     for r in seeds[seeds.variant == group].itertuples(index=False)]
        rows.append({"variant": group, "source": "ours", **ctx.group_settings(group),
                     **means.loc[group].to_dict(),
                     **{f"paper_{m}": published.get(m) for m in beside}})
    columns = ["variant", *(["run"] if e.per_seed else []), *(["source"] if as_rows else []),
               *e.settings, "n_seeds", *with_intervals([*e.metrics, *changes]),
               *(f"paper_{m}" for m in beside)]
    return pd.DataFrame(rows, columns=columns)


def curves(ctx: Context) -> pd.DataFrame:
    """One row per (run, step): metrics over the run's seeds, its settings, tokens seen per task
    (the mean over its seeds)."""
    e = ctx.experiment
    m = ctx.metrics[ctx.metrics.metric.isin(e.metrics)]
    wide = m.pivot_table(index=["run", "step"], columns="metric", values="value").reset_index()
    wide = wide.reindex(columns=["run", "step", *e.metrics])
    tokens = [] if ctx.logs.empty else ["t2i_tokens_seen", "i2t_tokens_seen"]
    if tokens:
        wide = pd.merge_asof(wide.sort_values("step"), ctx.logs.sort_values("step"), on="step",
                             by="run", direction="backward")
    wide["group"] = wide.run.map(ctx.group_of())
    order = {name: i for i, name in enumerate(e.groups)}
    wide = wide.sort_values(["group", "step"],
                            key=lambda c: c.map(order) if c.name == "group" else c)
    out = over_seeds(wide, ["group", "step"], e.metrics)
    if tokens:
        seen = wide.groupby(["group", "step"], sort=False)[tokens].mean().reset_index()
        out = out.merge(seen, on=["group", "step"], how="left")
    settings = pd.DataFrame([{"group": g, **ctx.group_settings(g)} for g in e.groups],
                            columns=["group", *e.settings])
    out = out.merge(settings, on="group", how="left").rename(columns={"group": "run"})
    return out[["run", "step", "n_seeds", *with_intervals(e.metrics), *e.settings, *tokens]]


def probe(ctx: Context) -> pd.DataFrame:
    """Probe top-1 (%) per (run, step, mode, layer) over the run's seeds, beside its settings."""
    group_of = ctx.group_of()
    rows = []
    for rec in ctx.metrics[ctx.metrics.metric == "probe"].itertuples():
        for mode, layers in rec.details.get("per_layer", {}).items():
            for layer, acc in layers.items():  # fractions, like the metric's value
                rows.append({"group": group_of[rec.run], "run": rec.run, "step": rec.step,
                             "mode": mode, "layer": int(layer), "probe": 100.0 * float(acc)})
    keys = ["group", "step", "mode", "layer"]
    frame = pd.DataFrame(rows, columns=[*keys, "run", "probe"])
    out = over_seeds(frame, keys, ["probe"])
    settings = pd.DataFrame([{"group": g, **ctx.group_settings(g)} for g in ctx.experiment.groups],
                            columns=["group", *ctx.experiment.settings])
    out = out.merge(settings, on="group", how="left").rename(columns={"group": "run"})
    return out[["run", "step", *ctx.experiment.settings, "mode", "layer", "n_seeds",
                *with_intervals(["probe"])]]


def caption_scores(record: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """{caption: {metric: value}} from a caption-metrics JSON (`details.rows`, as eval.caption_metrics
    writes it, or the first mapping of mappings in `details`)."""
    details = record.get("details") or {}
    if "rows" in details:
        return details["rows"]
    for value in details.values():
        if isinstance(value, Mapping) and value and all(isinstance(v, Mapping) for v in value.values()):
            return dict(value)
    return {k: v for k, v in details.items() if isinstance(v, Mapping)}


def captions(ctx: Context) -> pd.DataFrame:
    """Caption metrics of a long vs a short caption: ours beside the paper's (Supp. Fig. E)."""
    paper = ctx.paper_rows()
    ours: dict[str, dict[str, float]] = {}
    for record in ctx.caption_metrics:
        ours.update(caption_scores(record))
    rows = []
    for caption in list(dict.fromkeys([*paper, *ours])):
        metrics = dict.fromkeys([*paper.get(caption, {}), *ours.get(caption, {})])
        for metric in metrics:
            rows.append({"caption": caption, "metric": metric,
                         "ours": ours.get(caption, {}).get(metric),
                         "paper": paper.get(caption, {}).get(metric)})
    return pd.DataFrame(rows, columns=["caption", "metric", "ours", "paper"])


# One builder per measure (xfusion.config.MEASURES).
BUILDERS: dict[str, Callable[[Context], pd.DataFrame]] = {
    "table": table, "curves": curves, "probe": probe, "captions": captions,
}


def aggregate(raw: Mapping[str, Any], experiment: str, reference: Mapping[str, Any],
              metrics: Sequence[str] = (), base: Sequence[str] = (),
              train_logs: Sequence[str] = (), caption_metrics: Sequence[str] = ()) -> pd.DataFrame:
    ctx = Context(raw, experiment, reference, read_metrics(metrics), read_base(base),
                  tokens_seen(train_logs), [json.loads(Path(p).read_text()) for p in caption_metrics])
    return BUILDERS[ctx.experiment.measure](ctx).reset_index(drop=True)


def write_csv(frame: pd.DataFrame, out: str | Path) -> None:
    with atomic_path(out) as tmp:
        # 6 significant digits: eval.findings reads each interval back from these cells.
        frame.to_csv(tmp, index=False, float_format="%.6g")


def main(argv: list[str] | None = None) -> pd.DataFrame:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="config/<scale>.yaml (its experiments)")
    p.add_argument("--experiment", required=True, help="a key of config.experiments")
    p.add_argument("--reference", required=True, help="reference/paper_results.yaml")
    p.add_argument("--metrics", nargs="*", default=[], help="R/metrics/RUN/STEP/<metric>.json")
    p.add_argument("--base", nargs="*", default=[], help="NAME=R/metrics/base/NAME/mmlu.json")
    p.add_argument("--train-logs", nargs="*", default=[], help="RUN=R/runs/RUN/train_log.jsonl")
    p.add_argument("--caption-metrics", nargs="*", default=[], help="R/metrics/caption_metrics.json")
    p.add_argument("--out", required=True, help="R/tables/<experiment>.csv")
    args = p.parse_args(argv)
    frame = aggregate(load_yaml(args.config), args.experiment, load_yaml(args.reference),
                      args.metrics, args.base, args.train_logs, args.caption_metrics)
    write_csv(frame, args.out)
    return frame


if __name__ == "__main__":
    main()
