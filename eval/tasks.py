"""Per-task metrics of the downstream tasks (X-Fusion Supp. B.1; task data: xfusion.data.tasks).

  editing       `edit_pixel_error`: mean |output - target| over pixels in [0, 1];
                `edit_feature_distance`: 1 - cos of the judge's image embeddings (CLIP judge at
                tiny scale, the config's `evaluation.clip_model` elsewhere);
                `edit_detected`: the attribute classifier (eval.attribute_classifier, "the
                probe") reads the edited attribute's new value at the edited object's cell.
  localisation  `loc_iou`: IoU of the answer's box (BOX_FORMAT) with the true box; an answer
                without four numbers scores 0.
  painting      `paint_masked_error`: mean |output - target| over the masked pixels only.
  vqa           `vqa_exact_match`: normalised exact match (case, surrounding space, a final
                full stop ignored).
Each function scores one example; `summarise` averages them per metric. A perfect prediction
scores perfectly (error 0, IoU 1, match 1); tests/test_tasks.py checks that a wrong one does not.

References: GenEval (Ghosh et al. 2023) for detector-checked attributes; PIE-Bench (Ju et al.
2024) for edit distances to a target in pixel and feature space; VQAv2 for exact match.

    python -m eval.tasks --config C --run RUN --model MODEL_DIR --tasks R/tasks/heldout/tasks.jsonl \
        --classifier R/attribute_classifier --judges R/judges --outputs DIR --out JSON

scores a model's outputs (xfusion.sample_tasks) on the first `finetune.n_eval` held-out examples
of each task: JSON {"model", "metrics": {name: mean or null}, "n": {task: examples},
"seconds", "recipe", "examples": [{"id", "task", "prompt", "output", "answer"}]}.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from statistics import mean
from typing import Sequence

import torch

from xfusion.data import load_pixels, resolve_image
from xfusion.data.tasks import TASKS, parse_box

# metric name -> (task, lower is better): the columns of figureA
TASK_METRICS = {
    "edit_pixel_error": ("editing", True),
    "edit_feature_distance": ("editing", True),
    "edit_detected": ("editing", False),
    "loc_iou": ("localisation", False),
    "paint_masked_error": ("painting", True),
    "vqa_exact_match": ("vqa", False),
}


def to_unit(pixels: torch.Tensor) -> torch.Tensor:
    """[-1, 1] pixels (the codec's range) -> [0, 1]."""
    return (pixels.float().clamp(-1, 1) + 1) / 2


def pixel_error(output: torch.Tensor, target: torch.Tensor,
                region: torch.Tensor | None = None) -> float:
    """Mean absolute error in [0, 1] of (3, H, W) images in [-1, 1], over `region` (H, W) bool
    when given (every pixel otherwise)."""
    if output.shape != target.shape:
        raise ValueError(f"output {tuple(output.shape)} and target {tuple(target.shape)} differ")
    diff = (to_unit(output) - to_unit(target)).abs()  # (3, H, W)
    if region is None:
        return diff.mean().item()
    if not region.any():
        raise ValueError("pixel_error: the region holds no pixel")
    return diff[:, region].mean().item()


def mask_region(truth: dict, size: int) -> torch.Tensor:
    """(size, size) bool: the pixels a painting example masked (truth {"kind", "mask"})."""
    x0, y0, x1, y1 = truth["mask"]
    box = torch.zeros(size, size, dtype=torch.bool)
    box[y0:y1, x0:x1] = True
    return ~box if truth["kind"] == "outpaint" else box


def feature_distance(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - cos of embeddings (N, F) -> (N,): 0 for identical directions."""
    return 1 - torch.nn.functional.cosine_similarity(output.float(), target.float(), dim=-1)


def edit_detected(cells: dict[str, dict | None], truth: dict) -> bool:
    """Whether the classifier's reading of the output (`eval.attribute_classifier.predict`:
    {cell: {"shape", "colour"} or None}) shows the edit: the edited attribute's new value at
    the edited object's cell."""
    found = cells.get(truth["cell"])
    return found is not None and found[truth["attribute"]] == truth["to"]


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of boxes [x0, y0, x1, y1) (x1 > x0, y1 > y0 for a box with area)."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    area = lambda r: max(0.0, r[2] - r[0]) * max(0.0, r[3] - r[1])  # noqa: E731
    union = area(a) + area(b) - inter
    return inter / union if union > 0 else 0.0


def localisation_iou(answer: str, truth_box: Sequence[int]) -> float:
    box = parse_box(answer)
    return 0.0 if box is None else box_iou(box, truth_box)


def normalise_answer(text: str) -> str:
    return " ".join(text.strip().lower().rstrip(".").split())


def exact_match(answer: str, truth: str) -> float:
    return float(normalise_answer(answer) == normalise_answer(truth))


def summarise(per_example: dict[str, list[float]]) -> dict[str, float | None]:
    """Mean of each metric over its examples (None: no example of its task)."""
    return {m: (mean(per_example[m]) if per_example.get(m) else None) for m in TASK_METRICS}


# --- scoring a model's outputs (python -m eval.tasks) --------------------------------------------

def first_per_task(rows: list[dict], n: int) -> list[dict]:
    """The first `n` examples of each task, in file order: the same examples before and after."""
    seen: dict[str, int] = {}
    out = []
    for r in rows:
        if seen.get(r["task"], 0) < n:
            seen[r["task"]] = seen.get(r["task"], 0) + 1
            out.append(r)
    return out


def score_outputs(rows: list[dict], outputs: list[dict], jsonl: Path, image_size: int,
                  classifier=None, clip=None) -> tuple[dict[str, float | None], list[dict]]:
    """(per-metric means, per-example scores) of `outputs` (xfusion.sample_tasks) against the
    truth of `rows`. `classifier`: an AttributeClassifier (edit_detected; needs the world's
    cells); `clip`: (CLIPModel, processor) of the judge (edit_feature_distance)."""
    from PIL import Image

    from eval.attribute_classifier import predict
    from eval.clip_score import clip_features

    per: dict[str, list[float]] = {m: [] for m in TASK_METRICS}
    examples = []
    edits = [(r, o) for r, o in zip(rows, outputs) if r["task"] == "editing"]
    if edits:
        out_px = torch.stack([load_pixels(o["output"], image_size) for _, o in edits])
        tgt_px = torch.stack([load_pixels(resolve_image(r["target"], jsonl), image_size)
                              for r, _ in edits])
        per["edit_pixel_error"] = [pixel_error(a, b) for a, b in zip(out_px, tgt_px)]
        if classifier is not None and all("cell" in r["truth"] for r, _ in edits):
            cells = predict(classifier, out_px)
            per["edit_detected"] = [float(edit_detected(c, r["truth"]))
                                    for c, (r, _) in zip(cells, edits)]
        if clip is not None:
            images = lambda px: [Image.fromarray(  # noqa: E731
                (to_unit(p).permute(1, 2, 0) * 255).round().byte().numpy()) for p in px]
            a = clip_features(*clip, images=images(out_px))
            b = clip_features(*clip, images=images(tgt_px))
            per["edit_feature_distance"] = feature_distance(a, b).tolist()
    for r, o in zip(rows, outputs):
        if r["task"] == "localisation":
            per["loc_iou"].append(localisation_iou(o["output"], r["truth"]["box"]))
        elif r["task"] == "vqa":
            per["vqa_exact_match"].append(exact_match(o["output"], r["answer"]))
        elif r["task"] == "painting":
            out_px = load_pixels(o["output"], image_size)
            tgt_px = load_pixels(resolve_image(r["target"], jsonl), image_size)
            per["paint_masked_error"].append(
                pixel_error(out_px, tgt_px, mask_region(r["truth"], image_size)))
        examples.append({"id": r["id"], "task": r["task"], "prompt": r["prompt"],
                         "output": o["output"], "answer": r["answer"]})
    return summarise(per), examples


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="Score a model on the downstream tasks (Supp. B.1).")
    p.add_argument("--config", required=True)
    p.add_argument("--run", required=True, help="the run config.finetune fine-tunes")
    p.add_argument("--model", required=True, type=Path, help="a model dir (before or after)")
    p.add_argument("--tasks", required=True, type=Path, help="R/tasks/heldout/tasks.jsonl")
    p.add_argument("--classifier", type=Path, help="R/attribute_classifier (world source)")
    p.add_argument("--judges", type=Path, help="R/judges (evaluation.clip_model: judge_clip)")
    p.add_argument("--outputs", required=True, type=Path, help="dir for the output images")
    p.add_argument("--out", required=True, type=Path, help="R/finetune_scores/RUN/<stage>.json")
    args = p.parse_args(argv)
    from eval.attribute_classifier import AttributeClassifier
    from eval.clip_score import load_clip
    from eval.common import load_xfusion, resolve_evaluator
    from xfusion.config import load_run, recipe_hash
    from xfusion.io import atomic_write_json, read_jsonl
    from xfusion.sample_tasks import predict_tasks

    cfg = load_run(args.config, args.run)
    rows = first_per_task(read_jsonl(args.tasks), cfg.finetune.n_eval)
    model, _ = load_xfusion(args.model)
    start = time.perf_counter()
    outputs = predict_tasks(model, rows, args.tasks, cfg.evaluation, cfg.seed, args.outputs)
    classifier = AttributeClassifier.load(args.classifier) if args.classifier else None
    clip = load_clip(resolve_evaluator(cfg.evaluation.clip_model, args.judges))
    metrics, examples = score_outputs(rows, outputs, args.tasks, cfg.data.image_size,
                                      classifier, clip)
    record = {"model": str(args.model), "metrics": metrics,
              "n": {t: sum(r["task"] == t for r in rows) for t in TASKS},
              "seconds": time.perf_counter() - start,
              "recipe": recipe_hash(cfg, "finetune_eval"), "examples": examples}
    atomic_write_json(args.out, record)
    print(f"{args.model}: {metrics}")
    return record


if __name__ == "__main__":
    main()
