"""The tiny-scale REPA target that no metric uses: a small ViT trained to parse tiny-world scenes
patch by patch, then frozen (`model.repa.encoder: align_encoder`).

Why a separate encoder: X-Fusion Supp. A aligns the vision tower's hidden states with CLIP's
penultimate features. At tiny scale the pipeline's CLIP judge is also FID's feature extractor and
the CLIP scorer (eval/judges.py), so aligning to it would train the model toward its evaluators'
own feature space and inflate the measured gain of alignment (Supp. Fig. B). This encoder shares
no weights, no objective and no data with any evaluator:

- CLIP judge (FID features, CLIP score, BERTScore) and ITM judge (BLIP): train-split
  image-caption pairs; image-text contrastive and matching objectives.
- attribute classifier (eval/attribute_classifier.py, t2i_attr_acc): train-split images and
  scene records; a CNN names the shape and colour of each of the five position cells through one
  global head.
- align_encoder (this module): the images and scene records of the world's own `align` split
  (`data.n_align` images drawn like the others but seen by no evaluator and no training run),
  minus `model.repa.align.val_fraction` kept to measure it; a ViT names, at every patch, the
  shape, colour and size of the object under it, or background.

Its data is a split of its own, as CLIP's web images are neither COCO's nor the model's; the
metrics are measured on the held-out split, which no trained component reads. The objective
differs too: no caption is read, and the labels are dense (per patch, with size and background)
rather than a scene readout. Supervised rather than self-supervised: the tiny world's labels are exact and
free, a few hundred CPU steps learn them, and the augmentations a contrastive encoder relies on
(colour jitter, crops) would erase the colour and position the model must learn; dense labels
give one meaningful feature per patch, which REPA aligns token by token.

Saved as a transformers `CLIPVisionModel` with its `CLIPImageProcessor` (the training head is
dropped), so xfusion.train reads its penultimate patch features with the code that reads a
pretrained CLIP's at paper scale. Its width is `model.repa.feature_dim`.

    python -m xfusion.align_encoder --config C --scenes R/world/align/scenes.jsonl \
        --out R/align_encoder

writes the model dir and `quality.json` (per-patch accuracies on the kept-out align images,
beside the majority class's share).

References: REPA (Yu et al. 2025; the target is a frozen pretrained encoder, DINOv2 at best);
X-Fusion Supp. A.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

from xfusion.config import RunConfig, load_run
from xfusion.data import resolve_image
from xfusion.data.world import COLOURS, POSITIONS, SHAPES, SIZES
from xfusion.fit_heads import fit_heads
from xfusion.io import atomic_dir, atomic_write_json, read_jsonl

NONE = "none"  # background: first class of every attribute
ATTRIBUTES = ("shape", "colour", "size")
HEAD_DIM = 16  # attention head width: 4 heads at width 64


def vocab() -> dict[str, list[str]]:
    return {"shape": [NONE, *SHAPES], "colour": [NONE, *COLOURS], "size": [NONE, *SIZES]}


def patch_labels(scene: dict, grid: int) -> torch.Tensor:
    """(grid * grid, 3) class indices: per patch, row-major as a ViT orders them, the shape,
    colour and size of the object whose bounding square (centre POSITIONS, half-side SIZES of
    xfusion.data.world: every shape is drawn inside it) overlaps the patch, the one with the
    nearest centre where two do; 0 = background."""
    names = vocab()
    out = torch.zeros(grid * grid, len(ATTRIBUTES), dtype=torch.long)
    half = 0.5 / grid
    for k in range(grid * grid):
        cy, cx = (k // grid + 0.5) / grid, (k % grid + 0.5) / grid
        best = None
        for obj in scene["objects"]:
            (ox, oy), reach = POSITIONS[obj["position"]], SIZES[obj["size"]] + half
            centre = (cx - ox) ** 2 + (cy - oy) ** 2
            if (abs(cx - ox) < reach and abs(cy - oy) < reach
                    and (best is None or centre < best[0])):
                best = (centre, obj)
        if best is not None:
            out[k] = torch.tensor([names[a].index(best[1][a]) for a in ATTRIBUTES])
    return out


def build_encoder(cfg: RunConfig) -> tuple[CLIPVisionModel, CLIPImageProcessor]:
    """A CLIP vision tower of width model.repa.feature_dim on data.image_size px, and the image
    processor that both training and REPA target encoding apply."""
    a, width, size = cfg.model.repa.align, cfg.model.repa.feature_dim, cfg.data.image_size
    if size % a.patch_size:
        raise SystemExit(f"config.model.repa.align.patch_size = {a.patch_size}: must divide "
                         f"data.image_size = {size}")
    config = CLIPVisionConfig(image_size=size, patch_size=a.patch_size, hidden_size=width,
                              intermediate_size=4 * width, num_hidden_layers=a.layers,
                              num_attention_heads=max(1, width // HEAD_DIM))
    processor = CLIPImageProcessor(size={"shortest_edge": size},
                                   crop_size={"height": size, "width": size})
    return CLIPVisionModel(config), processor


def dense_logits(model: CLIPVisionModel, head: nn.Module, pixels: torch.Tensor) -> list:
    """Per attribute (B, P, n_classes) logits of every patch, from the last layer's tokens."""
    tokens = model(pixel_values=pixels).last_hidden_state[:, 1:]  # (B, P, D): CLS dropped
    return list(head(tokens).split([len(v) for v in vocab().values()], dim=-1))


def train(model: CLIPVisionModel, head: nn.Module, pixels: torch.Tensor, labels: torch.Tensor,
          cfg: RunConfig, gen: torch.Generator) -> list[float]:
    """Adam on the summed per-patch cross-entropies of the three attributes (xfusion.fit_heads,
    the attribute classifier's loop, with other labels, model and split)."""
    a = cfg.model.repa.align
    model.train()
    losses = fit_heads(lambda x: dense_logits(model, head, x),
                       [*model.parameters(), *head.parameters()], pixels, labels, a.steps,
                       a.batch_size, a.lr, gen, "align encoder")
    model.eval()
    return losses


@torch.no_grad()
def quality(model: CLIPVisionModel, head: nn.Module, pixels: torch.Tensor,
            labels: torch.Tensor) -> dict:
    """Per attribute: accuracy over all patches, over object patches, and the majority share."""
    out = {}
    for k, logits in enumerate(dense_logits(model.eval(), head, pixels)):
        truth, hit = labels[..., k], logits.argmax(-1) == labels[..., k]
        obj = truth != 0
        out[ATTRIBUTES[k]] = {"accuracy": hit.float().mean().item(),
                              "object_accuracy": hit[obj].float().mean().item(),
                              "majority": truth.flatten().bincount().max().item() / truth.numel()}
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--scenes", required=True, help="R/world/align/scenes.jsonl")
    p.add_argument("--out", required=True, type=Path, help="R/align_encoder")
    args = p.parse_args(argv)
    cfg = load_run(args.config)
    rows = read_jsonl(args.scenes)
    if any(r.get("scene") is None for r in rows):
        raise SystemExit(f"{args.scenes}: records without a scene; the align encoder needs "
                         "the tiny world's scene records (data.source: world)")
    torch.manual_seed(cfg.seed)
    model, processor = build_encoder(cfg)
    head = nn.Sequential(nn.LayerNorm(cfg.model.repa.feature_dim),
                         nn.Linear(cfg.model.repa.feature_dim, sum(map(len, vocab().values()))))
    images = [Image.open(resolve_image(r["image"], args.scenes)).convert("RGB") for r in rows]
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]  # (N, 3, S, S)
    grid = cfg.data.image_size // cfg.model.repa.align.patch_size
    labels = torch.stack([patch_labels(r["scene"], grid) for r in rows])  # (N, P, 3)
    gen = torch.Generator().manual_seed(cfg.seed)
    n_val = max(1, round(cfg.model.repa.align.val_fraction * len(rows)))
    perm = torch.randperm(len(rows), generator=gen)
    fit, val = perm[n_val:], perm[:n_val]
    start = time.perf_counter()
    losses = train(model, head, pixels[fit], labels[fit], cfg, gen)
    report = {"quality": quality(model, head, pixels[val], labels[val]), "n_fit": len(fit),
              "n_val": n_val, "steps": cfg.model.repa.align.steps,
              "train_seconds": round(time.perf_counter() - start, 1),
              "final_loss": float(torch.tensor(losses[-20:]).mean()),
              "trained_on": f"{args.scenes} minus {n_val} validation images"}
    with atomic_dir(args.out) as tmp:  # the head stays behind: REPA reads the encoder only
        for part in (model, processor):
            part.save_pretrained(tmp)
        atomic_write_json(tmp / "quality.json", report)
    summary = ", ".join(f"{a} {q['object_accuracy']:.3f}" for a, q in report["quality"].items())
    print(f"align encoder -> {args.out}: object-patch accuracy {summary}")
    return report


if __name__ == "__main__":
    main()
