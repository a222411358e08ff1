"""BLIP-2 ITM score of image-to-text captions: 100 * P(match | image, caption), averaged.

References:
- Li et al., "BLIP-2: Bootstrapping Language-Image Pre-training with Frozen Image Encoders and
  Large Language Models", ICML 2023 (arXiv:2301.12597): the Q-Former's image-text matching head,
  a 2-way classifier over the query outputs averaged across queries.
- transformers' `Blip2ForImageTextRetrieval(..., use_image_text_matching_head=True)`; LAVIS's
  `blip2_image_text_matching` (`model(..., match_head="itm")`) is the original implementation.
- X-Fusion Supp. C.2: BLIP ITM separates a detailed caption from a short poor one where
  CIDEr, BERTScore and CLIP score do not, hence the paper's "BLIP score".

Backends (`evaluation.itm_backend`):
- `transformers` (default): `evaluation.itm_model` is a BLIP-2 ITM checkpoint
  (Salesforce/blip2-itm-vit-g) or `judge_itm`, the tiny model `eval.judges` trains.
- `lavis`: runs `eval/lavis_itm.py` with the Python of the LAVIS environment
  (workflow/envs/lavis.yaml; LAVIS pins transformers < 4.27, so it cannot share ours), given by
  `--lavis-python` or $XFUSION_LAVIS_PYTHON (default .envs/lavis/bin/python).

    python -m eval.itm --config C --captions R/samples/RUN/STEP/i2t.jsonl [--judges R/judges] \
        --run RUN --step STEP --out R/metrics/RUN/STEP/blip.json

The metric is `blip` (the paper's column; xfusion.config.METRICS), in the file name, the JSON,
the tables and MLflow; `itm` names the evaluator (this module, its rule, `evaluation.itm_*`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from tqdm import tqdm
from transformers import AutoProcessor, Blip2ForImageTextRetrieval

from eval.common import (batches, device, load_config, load_images, metric_parser, read_pairs,
                         resolve_evaluator, write_metric)
from xfusion.data import BadInputs, report_path
from xfusion.io import atomic_write_jsonl

LAVIS_SCRIPT = Path(__file__).with_name("lavis_itm.py")


def load_itm(name_or_path: str) -> tuple[Blip2ForImageTextRetrieval, AutoProcessor]:
    model = Blip2ForImageTextRetrieval.from_pretrained(name_or_path).eval().to(device())
    return model, AutoProcessor.from_pretrained(name_or_path)


def itm_logits(model: Blip2ForImageTextRetrieval, processor, images: Sequence[Image.Image],
               texts: Sequence[str]) -> torch.Tensor:
    """ITM head logits (N, 2) [no-match, match] of N aligned pairs, with gradients if enabled
    (eval.judges trains through this same path)."""
    dev = next(model.parameters()).device
    inputs = processor(images=list(images), text=list(texts), return_tensors="pt", padding=True,
                       truncation=True)
    out = model(**{k: v.to(dev) for k, v in inputs.items()}, use_image_text_matching_head=True)
    return out.logits_per_image


@torch.no_grad()
def itm_match_probs(model: Blip2ForImageTextRetrieval, processor, images: Sequence[Image.Image],
                    texts: Sequence[str], batch_size: int = 32,
                    desc: str | None = "BLIP-2 ITM") -> torch.Tensor:
    """P(match) of each (image, text) pair: softmax over the 2 ITM logits, class 1. (N,)"""
    if len(images) != len(texts):
        raise ValueError(f"itm_match_probs: {len(images)} images but {len(texts)} texts")
    out = []
    for sl in tqdm(batches(len(texts), batch_size), desc=desc, disable=desc is None, leave=False):
        logits = itm_logits(model, processor, images[sl], texts[sl])
        out.append(logits.float().softmax(-1)[:, 1].cpu())
    return torch.cat(out)


def lavis_match_probs(images: Sequence[Path], captions: Sequence[str], python: str,
                      batch_size: int) -> torch.Tensor:
    """Run eval/lavis_itm.py in the LAVIS environment; it writes one P(match) per line."""
    if not Path(python).exists():
        raise SystemExit(f"itm_backend=lavis: no LAVIS Python at {python}; create the env with "
                         "`conda env create -p .envs/lavis -f workflow/envs/lavis.yaml` (make "
                         "lavis-env) or pass --lavis-python")
    with tempfile.TemporaryDirectory() as tmp:
        pairs, scores = Path(tmp) / "pairs.jsonl", Path(tmp) / "scores.txt"
        atomic_write_jsonl(pairs, [{"image": str(Path(i).resolve()), "caption": c}
                                   for i, c in zip(images, captions)])
        cmd = [python, str(LAVIS_SCRIPT), "--pairs", str(pairs), "--batch-size",
               str(batch_size), "--out", str(scores)]
        proc = subprocess.run(cmd, stdout=sys.stderr)
        if proc.returncode != 0:
            raise SystemExit(f"itm_backend=lavis: {' '.join(cmd)} failed "
                             f"(exit {proc.returncode}); see its message above")
        probs = torch.tensor([float(x) for x in scores.read_text().split()])
    if len(probs) != len(captions):
        raise SystemExit(f"itm_backend=lavis: {len(probs)} scores for {len(captions)} pairs")
    return probs


def main(argv: list[str] | None = None) -> dict:
    p = metric_parser(__doc__.split("\n")[0])
    p.add_argument("--captions", required=True, help='I2T captions jsonl '
                   '({"id", "image", "reference", "caption"})')
    p.add_argument("--lavis-python", default=os.environ.get("XFUSION_LAVIS_PYTHON",
                                                            ".envs/lavis/bin/python"))
    args = p.parse_args(argv)
    cfg = load_config(args)
    bad = BadInputs(cfg.data.bad_input_policy)
    e = cfg.evaluation
    paths, captions, _ = read_pairs(args.captions, "caption", bad)
    if e.itm_backend == "lavis":
        probs = lavis_match_probs(paths, captions, args.lavis_python, args.batch_size)
        model_name = "lavis:blip2_image_text_matching/pretrain"
    else:
        model, processor = load_itm(resolve_evaluator(e.itm_model, args.judges))
        probs = itm_match_probs(model, processor, load_images(paths), captions, args.batch_size)
        model_name = e.itm_model
    scores = 100.0 * probs
    bad.finish(report_path(args.out))
    return write_metric(args.out, "blip", scores.mean().item(), cfg=cfg, job="itm",
                        run=args.run, step=args.step,
                        n=len(scores), details={"backend": e.itm_backend, "model": model_name,
                                                "std": scores.std().item() if len(scores) > 1
                                                else 0.0})


if __name__ == "__main__":
    main()
