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
Each function scores one example; `score_examples` averages them per task. A perfect prediction
scores perfectly (error 0, IoU 1, match 1); tests/test_tasks.py checks that a wrong one does not.

References: GenEval (Ghosh et al. 2023) for detector-checked attributes; PIE-Bench (Ju et al.
2024) for edit distances to a target in pixel and feature space; VQAv2 for exact match.
"""

from __future__ import annotations

from statistics import mean
from typing import Sequence

import torch

from xfusion.data.tasks import parse_box

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
