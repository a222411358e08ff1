"""Collect an experiment's metric JSONs into one CSV, ours beside the published numbers.

    python -m eval.aggregate --config C --experiment table1 --reference reference/paper_results.yaml \
        --metrics R/metrics/RUN/STEP/{fid,clip,itm,mmlu}.json … [--base NAME=R/metrics/base/NAME/mmlu.json …] \
        [--train-logs RUN=R/runs/RUN/train_log.jsonl …] [--caption-metrics R/metrics/caption_metrics.json] \
        --out results/table1.csv

Metric files follow docs/INTERFACES.md (`{"metric", "value", "run", "step", "n", "details"}`),
named `R/metrics/RUN/STEP/<kind>.json`; the file name gives the kind (`itm` is the paper's BLIP
column) and the path gives run and step where the JSON leaves them null. MMLU and probe accuracies
are fractions and are reported as percentages, like the paper; CLIP and BLIP (ITM) scores are
already x100. The tiny world's ground-truth metrics `t2i_attr_acc` and `i2t_attr_recall`
(percentages too) get columns beside them where their files are given (no paper_* column). Tables: table1, tableA, lr_ratio (one row per variant). Figures: one row per
(run, step) with the run's varied settings (figure5/6/8/B), per (run, mode, layer) for figureD,
per (caption, metric) for figureE. The figure code (eval.plots) reads these CSVs only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import pandas as pd

from xfusion.config import ARCHITECTURES, experiments_from_dict, load_yaml, resolve_run
from xfusion.io import atomic_path, read_jsonl

# Ground-truth attribute metrics of the tiny world (eval.geneval, eval.caption_attributes): one
# name for file, JSON, column and plot. The paper has no such numbers, and scales without scene
# records have no such files: their columns appear only where some file was given.
ATTRIBUTE_METRICS = ["t2i_attr_acc", "i2t_attr_recall"]
COLUMN = {"fid": "fid", "clip": "clip", "itm": "blip", "mmlu": "mmlu", "probe": "probe",
          **{m: m for m in ATTRIBUTE_METRICS}}
PERCENT = {"mmlu", "probe", *ATTRIBUTE_METRICS}  # fractions in the JSON, percentages in tables
TABLE_METRICS = ["mmlu", "fid", "clip", "blip"]
CURVE_METRICS = ["fid", "clip", "blip"]


def read_metrics(paths: Sequence[str | Path]) -> pd.DataFrame:
    """One row per metric file: run, step, column (fid/clip/blip/mmlu/probe), value, details."""
    rows = []
    for path in map(Path, paths):
        record = json.loads(path.read_text())
        kind = path.stem
        if kind not in COLUMN:
            raise SystemExit(f"{path}: unknown metric file name (expected one of {', '.join(COLUMN)})")
        value = float(record["value"]) * (100.0 if kind in PERCENT else 1.0)
        rows.append({"run": record.get("run") or path.parent.parent.name,
                     "step": int(record["step"] if record.get("step") is not None else path.parent.name),
                     "column": COLUMN[kind], "value": value, "details": record.get("details") or {}})
    return pd.DataFrame(rows, columns=["run", "step", "column", "value", "details"])


def measured(metrics: pd.DataFrame, columns: Sequence[str]) -> list[str]:
    """The columns among `columns` that some metric file reports."""
    return [c for c in columns if (metrics.column == c).any()]


def final_values(metrics: pd.DataFrame, run: str) -> dict[str, float]:
    """The run's metrics at its last measured step."""
    mine = metrics[metrics.run == run]
    if mine.empty:
        return {}
    last = mine[mine.step == mine.step.max()]
    return dict(zip(last.column, last.value))


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
    """What every builder needs: the experiment's runs (resolved), metrics and reference."""

    def __init__(self, raw: Mapping[str, Any], experiment: str, reference: Mapping[str, Any],
                 metrics: pd.DataFrame, base: dict[str, float], logs: pd.DataFrame,
                 caption_metrics: list[dict]):
        exps = experiments_from_dict(raw)
        if experiment not in exps:
            raise SystemExit(f"experiment {experiment!r} not in config.experiments "
                             f"(known: {', '.join(exps)})")
        self.experiment = exps[experiment]
        self.runs = {name: resolve_run(raw, name) for name in self.experiment.runs}
        self.paper = reference.get("xfusion", {})
        self.metrics, self.base, self.logs = metrics, base, logs
        self.caption_metrics = caption_metrics

    def base_rows(self) -> list[dict]:
        return [{"variant": name, "mmlu": value} for name, value in self.base.items()]


def paper_row(rows: Mapping[str, Any], run_name: str, architecture: str) -> dict:
    return rows.get(run_name) or rows.get(architecture) or {}


def table1(ctx: Context) -> pd.DataFrame:
    """Base LLM row + one row per variant; paper_* from X-Fusion Table 1."""
    ref = ctx.paper.get("table1", {}).get("rows", {})
    llm_rows = [v for k, v in ref.items() if k not in ARCHITECTURES]  # the base LLM's row
    ours_only = measured(ctx.metrics, ATTRIBUTE_METRICS)
    rows = []
    for row in ctx.base_rows():
        rows.append({**row, **{f"paper_{m}": (llm_rows[0] if llm_rows else {}).get(m)
                               for m in TABLE_METRICS}})
    for name, run in ctx.runs.items():
        ours = final_values(ctx.metrics, name)
        paper = paper_row(ref, name, run.model.architecture)
        rows.append({"variant": name, **{m: ours.get(m) for m in TABLE_METRICS + ours_only},
                     **{f"paper_{m}": paper.get(m) for m in TABLE_METRICS}})
    columns = ["variant", *TABLE_METRICS, *ours_only, *(f"paper_{m}" for m in TABLE_METRICS)]
    return pd.DataFrame(rows, columns=columns)


def table_a(ctx: Context) -> pd.DataFrame:
    """Published systems of Supp. Table A, then our final model(s)."""
    rows = [{"system": name, "source": "paper", **values}
            for name, values in ctx.paper.get("tableA", {}).get("rows", {}).items()]
    for name, run in ctx.runs.items():
        ours = final_values(ctx.metrics, name)
        rows.append({"system": f"ours: {name}", "source": "ours",
                     "base_llm": run.model.base_lm.name, "mmlu": ours.get("mmlu"),
                     "coco_blip": ours.get("blip"), "coco_fid": ours.get("fid")})
    return pd.DataFrame(rows, columns=["system", "source", "base_llm", "mmlu", "coco_blip",
                                       "coco_fid"])


def lr_ratio(ctx: Context) -> pd.DataFrame:
    """Single tower with text/image lr ratio 0, 0.1, 1; MMLU change against the base LLM."""
    rows = ctx.base_rows()
    metrics = TABLE_METRICS + measured(ctx.metrics, ATTRIBUTE_METRICS)
    for name, run in ctx.runs.items():
        ours = final_values(ctx.metrics, name)
        base = ctx.base.get(run.model.base_lm.name)
        mmlu = ours.get("mmlu")
        rows.append({"variant": name, "lr_text_ratio": run.training.lr_text_ratio,
                     **{m: ours.get(m) for m in metrics},
                     "mmlu_change": None if mmlu is None or base is None else mmlu - base})
    return pd.DataFrame(rows, columns=["variant", "lr_text_ratio", *metrics, "mmlu_change"])


def curves(ctx: Context) -> pd.DataFrame:
    """One row per (run, step): metrics, the run's varied settings, tokens seen per task."""
    metrics = CURVE_METRICS + measured(ctx.metrics, ATTRIBUTE_METRICS)
    m = ctx.metrics[ctx.metrics.column.isin(metrics)]
    wide = m.pivot_table(index=["run", "step"], columns="column", values="value").reset_index()
    wide = wide.reindex(columns=["run", "step", *metrics])
    settings = pd.DataFrame([{
        "run": name, "architecture": r.model.architecture, "base_lm": r.model.base_lm.name,
        "repa": r.model.repa.enabled, "t2i_ratio": r.training.t2i_ratio,
        "i2t_noise_max": r.training.i2t_noise_max} for name, r in ctx.runs.items()])
    out = wide.merge(settings, on="run", how="left")
    if not ctx.logs.empty:
        out = pd.merge_asof(out.sort_values("step"), ctx.logs.sort_values("step"), on="step",
                            by="run", direction="backward")
    order = {name: i for i, name in enumerate(ctx.runs)}
    return out.sort_values(["run", "step"], key=lambda c: c.map(order) if c.name == "run" else c)


def figure_d(ctx: Context) -> pd.DataFrame:
    """Probe accuracy (%) per (run, mode, layer); the run's I2T noise limit says clean/noisy."""
    rows = []
    for rec in ctx.metrics[ctx.metrics.column == "probe"].itertuples():
        noise = ctx.runs[rec.run].training.i2t_noise_max if rec.run in ctx.runs else None
        for mode, layers in rec.details.get("per_layer", {}).items():
            for layer, acc in layers.items():
                rows.append({"run": rec.run, "step": rec.step, "i2t_noise_max": noise,
                             "mode": mode, "layer": int(layer), "accuracy": 100.0 * float(acc)})
    return pd.DataFrame(rows, columns=["run", "step", "i2t_noise_max", "mode", "layer", "accuracy"])


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


def figure_e(ctx: Context) -> pd.DataFrame:
    """Caption metrics of a long vs a short caption: ours beside Supp. Fig. E."""
    paper = ctx.paper.get("figureE", {}).get("rows", {})
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


BUILDERS: dict[str, Callable[[Context], pd.DataFrame]] = {
    "table1": table1, "tableA": table_a, "lr_ratio": lr_ratio, "figure5": curves,
    "figure6": curves, "figure8": curves, "figureB": curves, "figureD": figure_d,
    "figureE": figure_e,
}
BY_KIND = {"table": table1, "figure": curves}


def aggregate(raw: Mapping[str, Any], experiment: str, reference: Mapping[str, Any],
              metrics: Sequence[str] = (), base: Sequence[str] = (),
              train_logs: Sequence[str] = (), caption_metrics: Sequence[str] = ()) -> pd.DataFrame:
    ctx = Context(raw, experiment, reference, read_metrics(metrics), read_base(base),
                  tokens_seen(train_logs), [json.loads(Path(p).read_text()) for p in caption_metrics])
    build = BUILDERS.get(experiment, BY_KIND[ctx.experiment.kind])
    return build(ctx).reset_index(drop=True)


def write_csv(frame: pd.DataFrame, out: str | Path) -> None:
    with atomic_path(out) as tmp:
        frame.to_csv(tmp, index=False, float_format="%.4g")


def main(argv: list[str] | None = None) -> pd.DataFrame:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="config/<scale>.yaml (its experiments)")
    p.add_argument("--experiment", required=True, help="a key of config.experiments")
    p.add_argument("--reference", required=True, help="reference/paper_results.yaml")
    p.add_argument("--metrics", nargs="*", default=[], help="R/metrics/RUN/STEP/<kind>.json")
    p.add_argument("--base", nargs="*", default=[], help="NAME=R/metrics/base/NAME/mmlu.json")
    p.add_argument("--train-logs", nargs="*", default=[], help="RUN=R/runs/RUN/train_log.jsonl")
    p.add_argument("--caption-metrics", nargs="*", default=[], help="R/metrics/caption_metrics.json")
    p.add_argument("--out", required=True, help="results/<experiment>.csv")
    args = p.parse_args(argv)
    frame = aggregate(load_yaml(args.config), args.experiment, load_yaml(args.reference),
                      args.metrics, args.base, args.train_logs, args.caption_metrics)
    write_csv(frame, args.out)
    return frame


if __name__ == "__main__":
    main()
