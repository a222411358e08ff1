"""CLIP score of text-to-image samples: 100 * max(cos(image, text), 0), averaged over pairs.

Each pair's cosine is clipped at 0 before the mean: the CLIP score as Hessel et al. define it
(CLIP-S, 2021). X-Fusion reports "CLIP scores" (Table 1 and the supplementary) citing CLIP itself
(Radford et al.) without a formula, so we take the metric's defining paper. torchmetrics'
`CLIPScore` differs: it averages the raw cosines and clips the mean, `max(mean(100 * cos), 0)`,
so there a pair with a negative cosine pulls the value down and here it counts as 0; the two
agree only when no pair's cosine is negative. Like torchmetrics and the T2I literature we scale
by 100 where CLIP-S scales by w = 2.5.

References:
- Hessel et al., "CLIPScore: A Reference-free Evaluation Metric for Image Captioning",
  EMNLP 2021 (arXiv:2104.08718): CLIP-S(c, v) = w * max(cos(c, v), 0) per pair, then the
  corpus mean.
- torchmetrics `multimodal.CLIPScore.compute`: `max(score / n_samples, 0)`, the clipped mean.
- Radford et al., "Learning Transferable Visual Models From Natural Language Supervision",
  ICML 2021 (CLIP); transformers' `CLIPModel.get_{image,text}_features`.

Paper scale: `evaluation.clip_model` is a CLIP checkpoint (openai/clip-vit-large-patch14).
Tiny scale: `judge_clip`, the dual encoder `eval.judges` trains on held-out tiny-world pairs.
Texts longer than the text encoder's context (77 tokens for OpenAI CLIP; long captions exceed
it) are truncated, as every CLIP-score implementation must.

    python -m eval.clip_score --config C --samples R/samples/RUN/STEP/t2i/index.jsonl \
        [--judges R/judges] --run RUN --step STEP --out R/metrics/RUN/STEP/clip.json
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm
from transformers import AutoProcessor, CLIPModel

from eval.common import (batches, device, load_config, load_images, metric_parser, read_pairs,
                         resolve_evaluator, write_metric)
from xfusion.data import BadInputs, report_path


def load_clip(name_or_path: str) -> tuple[CLIPModel, AutoProcessor]:
    model = CLIPModel.from_pretrained(name_or_path).eval().to(device())
    return model, AutoProcessor.from_pretrained(name_or_path)


@torch.no_grad()
def clip_features(model: CLIPModel, processor, *, images: Sequence[Image.Image] | None = None,
                  texts: Sequence[str] | None = None, batch_size: int = 64,
                  desc: str | None = None) -> torch.Tensor:
    """L2-normalised projected embeddings of `images` or of `texts`: (N, projection_dim)."""
    if (images is None) == (texts is None):
        raise ValueError("clip_features: pass exactly one of images= or texts=")
    items = images if images is not None else texts
    dev = next(model.parameters()).device
    out = []
    for sl in tqdm(batches(len(items), batch_size), desc=desc, disable=desc is None, leave=False):
        if images is not None:
            px = processor(images=list(items[sl]), return_tensors="pt")["pixel_values"]
            emb = model.get_image_features(pixel_values=px.to(dev))
        else:
            tok = processor(text=list(items[sl]), return_tensors="pt", padding=True,
                            truncation=True)
            emb = model.get_text_features(input_ids=tok["input_ids"].to(dev),
                                          attention_mask=tok["attention_mask"].to(dev))
        # transformers 5 returns a model output whose pooler_output is the projected embedding.
        emb = emb if torch.is_tensor(emb) else emb.pooler_output
        out.append(F.normalize(emb.float(), dim=-1).cpu())
    return torch.cat(out)


def clip_scores(model: CLIPModel, processor, images: Sequence[Image.Image],
                texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """Per-pair CLIP score 100 * max(cos, 0): (N,); the metric is their mean (module docstring)."""
    if len(images) != len(texts):
        raise ValueError(f"clip_scores: {len(images)} images but {len(texts)} texts")
    img = clip_features(model, processor, images=images, batch_size=batch_size, desc="CLIP images")
    txt = clip_features(model, processor, texts=texts, batch_size=batch_size, desc="CLIP texts")
    return 100.0 * (img * txt).sum(-1).clamp(min=0)


def main(argv: list[str] | None = None) -> dict:
    p = metric_parser(__doc__.split("\n")[0])
    p.add_argument("--samples", required=True, help="T2I samples index.jsonl "
                   '({"index", "id", "prompt", "file"})')
    args = p.parse_args(argv)
    cfg = load_config(args)
    bad = BadInputs(cfg.data.bad_input_policy)
    paths, prompts, _ = read_pairs(args.samples, "prompt", bad, image_key="file")
    name = resolve_evaluator(cfg.evaluation.clip_model, args.judges)
    model, processor = load_clip(name)
    scores = clip_scores(model, processor, load_images(paths), prompts, args.batch_size)
    bad.finish(report_path(args.out))
    return write_metric(args.out, "clip", scores.mean().item(), cfg=cfg, job="clip_score",
                        run=args.run, step=args.step,
                        n=len(scores), details={"model": cfg.evaluation.clip_model,
                                                "std": scores.std().item() if len(scores) > 1
                                                else 0.0})


if __name__ == "__main__":
    main()
