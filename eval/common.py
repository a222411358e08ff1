"""Shared plumbing of the metric entry points: CLI arguments, the metric JSON, image,
evaluator and trained-model loading.

Every `python -m eval.<metric>` writes one JSON (docs/INTERFACES.md, "Metrics"):
`{"metric", "value", "run", "step", "n", "recipe", "details"}`, atomically; `recipe` holds the
hashes of what the number depends on (xfusion.config.READS): `train`, the run's train recipe (null
without a run), and `eval`, the config the evaluation and its sampling read.

Image-text pairs files are user data read under `data.bad_input_policy` (`read_pairs`,
xfusion.data): a metric's skip report is `<metric>.bad_inputs.json` beside its JSON.

Evaluators are named in the config either by a pretrained path / hub id (paper scale) or by
`judge_clip` / `judge_itm`, the tiny-scale stand-ins that `eval.judges` trains into
`R/judges/{clip,itm}/`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from xfusion.config import METRICS, RunConfig, load_run, recipe_hash, train_recipe
from xfusion.data import BadInputs, read_records, record_image, resolve_image
from xfusion.io import atomic_write_json
from xfusion.tracking import log_metrics

# Names in `evaluation.{clip_model, itm_model, fid_extractor, bertscore_model}` that mean "the
# judge trained by eval.judges" rather than a pretrained checkpoint; value = its subdirectory.
JUDGES = {"judge_clip": "clip", "judge_itm": "itm"}


def metric_parser(description: str) -> argparse.ArgumentParser:
    """The arguments every metric shares; each module adds its inputs."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", required=True, help="config/<scale>.yaml")
    p.add_argument("--run", default=None, help="run name (applies its overrides; recorded)")
    p.add_argument("--step", type=int, default=None, help="training step (recorded)")
    p.add_argument("--judges", default=None, help="R/judges: where judge_clip / judge_itm live")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", required=True, help="metric JSON to write")
    return p


def load_config(args: argparse.Namespace) -> RunConfig:
    return load_run(args.config, args.run)


def metric_recipe(cfg: RunConfig, job: str, run: str | None) -> dict[str, str | None]:
    """The recipe hashes a metric of `job` (its Snakemake rule) carries."""
    return {"train": train_recipe(cfg) if run is not None else None,
            "eval": recipe_hash(cfg, job)}


def write_metric(out: str | Path, metric: str, value: float, *, cfg: RunConfig, job: str,
                 run: str | None, step: int | None, n: int,
                 details: dict[str, Any] | None = None) -> dict:
    """Write the metric JSON of docs/INTERFACES.md atomically and return it; `cfg` (the run's
    config) and `job` give its recipe hashes. A metric of a trained run's step is also logged to
    that run in MLflow, at that step, so the dashboard draws the paper's curves."""
    if run is not None and step is not None and metric not in METRICS:
        raise ValueError(f"metric {metric!r} of run {run} step {step}: not a name of "
                         f"xfusion.config.METRICS ({', '.join(METRICS)})")
    record = {"metric": metric, "value": float(value), "run": run, "step": step, "n": int(n),
              "recipe": metric_recipe(cfg, job, run), "details": details or {}}
    atomic_write_json(out, record)
    if run is not None and step is not None:
        # INTERFACES.md layout: R/metrics/RUN/STEP/<metric>.json beside R/runs/RUN.
        run_dir = Path(out).resolve().parents[3] / "runs" / run
        if run_dir.is_dir():
            log_metrics(run_dir, {metric: record["value"]}, int(step))
    return record


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_xfusion(model_dir: str | Path):
    """(model, tokenizer) of an X-Fusion model dir (R/runs/RUN/steps/STEP) on the base LLM its
    base_model.json names, in eval mode on `device()`."""
    from xfusion.model import XFusionModel  # the model stack: only the metrics that need it

    model = XFusionModel.load(model_dir)
    return model.eval().to(device()), model.tokenizer


def resolve_evaluator(name: str, judges: str | Path | None) -> str:
    """A config's evaluator name -> a directory or hub id that from_pretrained accepts."""
    if name not in JUDGES:
        return name
    if judges is None:
        raise SystemExit(f"evaluator {name!r} is a pipeline-trained judge: pass --judges R/judges "
                         "(written by `python -m eval.judges`)")
    path = Path(judges) / JUDGES[name]
    if not (path / "config.json").exists():
        raise SystemExit(f"{path}: no judge here; run `python -m eval.judges --out {judges}` first")
    return str(path)


def load_images(paths: Sequence[str | Path]) -> list[Image.Image]:
    return [Image.open(p).convert("RGB") for p in paths]


def read_pairs(path: str | Path, text_key: str, bad: BadInputs,
               image_key: str = "image") -> tuple[list[Path], list[str], list[dict]]:
    """(image paths, texts, rows) of a JSONL of image-text pairs (captions, samples index). A
    line that does not decode or lacks a key, or an image that is missing or not whole, is a
    bad input (`bad`, under `data.bad_input_policy`): left out, or a stop naming it."""
    pairs = [(line, row) for line, row in read_records(path, bad, keys=(text_key, image_key))
             if record_image(row, path, line, bad, key=image_key) is not None]
    if not pairs:
        raise SystemExit(f"{path}: no image-text pair to evaluate")
    rows = [row for _, row in pairs]
    return [resolve_image(r[image_key], path) for r in rows], [r[text_key] for r in rows], rows


def batches(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]
