"""A small CNN that reads a tiny-world scene back from its image: the ground-truth judge of
`eval.geneval` (T2I attribute accuracy), trained on the world's real train images.

GenEval (Ghosh et al., NeurIPS 2023) checks generated images with an object detector: is the
prompt's object there, in the prompt's colour, at the prompt's place, as many times as asked?
The tiny world needs no detector: objects sit in the fixed position cells of
`xfusion.data.world.POSITIONS` and never overlap, so a classifier with one (shape, colour) head
per cell reads the whole scene. Each head has a "none" class (empty cell); the object count and
the layout follow from which cells are occupied. Reading the primary object at its cell avoids
the ambiguity of a global "primary object" classifier: the primary object (`labels`, the scene's
first object, which the captioner mentions first and the linear probe classifies) is always
large, but another object may be large too, and only the record says which one came first.

Vocabularies come from `xfusion.data.world` (SHAPES, COLOURS, POSITIONS); a scene record is the
world's (`{"objects": [{"shape", "colour", "size", "position"}, ...], ...}`). Only sources with
scene records can train it (`data.source: world`); at paper scale the rule does not exist.

    python -m eval.attribute_classifier --config C --train-scenes R/world/train/scenes.jsonl \
        --scenes R/world/heldout/scenes.jsonl --out R/attribute_classifier

writes `config.json` (vocabularies, width), `model.safetensors` and `quality.json` (the
attribute accuracies of `score` on the held-out real images, with chance levels).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import Counter
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from xfusion.config import EvaluationConfig, load_run
from xfusion.data import load_pixels, resolve_image
from xfusion.data.world import COLOURS, POSITIONS, SHAPES
from xfusion.fit_heads import fit_heads
from xfusion.io import atomic_dir, atomic_write_json, read_jsonl

NONE = "none"  # class of an empty cell, first in every head's vocabulary
ATTRIBUTES = ("shape", "colour")  # read per cell; `value` of eval.geneval needs both right


# --- labels -------------------------------------------------------------------------------------

def primary(row: dict) -> dict:
    """The primary object of a scenes.jsonl record: the scene's first object, whose shape and
    colour are the record's `labels` (what eval.linear_probe classifies)."""
    scene, labels = row.get("scene"), row.get("labels")
    if scene is None:
        raise SystemExit(f"record {row.get('id')}: no scene record; attribute metrics need the "
                         "tiny world's scenes (data.source: world)")
    obj = scene["objects"][0]
    if labels is not None and any(labels[a] != obj[a] for a in ATTRIBUTES):
        raise SystemExit(f"record {row['id']}: labels {labels} are not its first object {obj}")
    return obj


def cell_targets(scene: dict, vocab: dict[str, list[str]]) -> torch.Tensor:
    """(n_cells, n_attributes) class indices: the object's attribute per cell, 0 = none."""
    at = {o["position"]: o for o in scene["objects"]}
    return torch.tensor([[vocab[a].index(at[c][a]) if c in at else 0 for a in ATTRIBUTES]
                         for c in vocab["cells"]])


def world_vocab() -> dict[str, list[str]]:
    return {"cells": list(POSITIONS), "shape": [NONE, *SHAPES], "colour": [NONE, *COLOURS]}


# --- the classifier -----------------------------------------------------------------------------

class AttributeClassifier(nn.Module):
    """Three conv stages (full, 1/2, 1/4 resolution), pooled to a 4x4 map so position survives,
    then one MLP whose output holds every cell's shape and colour logits (~350k parameters at
    width 32 on 32 px)."""

    def __init__(self, vocab: dict[str, list[str]], width: int = 32, hidden: int = 256):
        super().__init__()
        self.vocab, self.width, self.hidden = vocab, width, hidden

        def block(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out),
                                 nn.ReLU(), nn.Conv2d(c_out, c_out, 3, padding=1),
                                 nn.BatchNorm2d(c_out), nn.ReLU())

        self.features = nn.Sequential(block(3, width), nn.MaxPool2d(2), block(width, 2 * width),
                                      nn.MaxPool2d(2), block(2 * width, 2 * width),
                                      nn.AdaptiveAvgPool2d(4))
        self.sizes = [len(vocab[a]) for a in ATTRIBUTES]
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * 16, hidden), nn.ReLU(),
                                  nn.Linear(hidden, len(vocab["cells"]) * sum(self.sizes)))

    def forward(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """pixels (B, 3, H, W) in [-1, 1] -> per attribute logits (B, n_cells, n_classes)."""
        out = self.head(self.features(pixels))  # (B, n_cells * sum(sizes))
        out = out.view(len(pixels), len(self.vocab["cells"]), sum(self.sizes))
        return list(out.split(self.sizes, dim=-1))

    def save(self, out: Path) -> None:
        save_file(self.state_dict(), str(out / "model.safetensors"))
        atomic_write_json(out / "config.json", {"vocab": self.vocab, "width": self.width,
                                                "hidden": self.hidden})

    @classmethod
    def load(cls, path: str | Path) -> "AttributeClassifier":
        path = Path(path)
        if not (path / "model.safetensors").exists():
            raise SystemExit(f"{path}: no attribute classifier here; run "
                             f"`python -m eval.attribute_classifier --out {path}` first")
        cfg = json.loads((path / "config.json").read_text())
        model = cls(cfg["vocab"], cfg["width"], cfg["hidden"])
        model.load_state_dict(load_file(str(path / "model.safetensors")))
        return model.eval()


def load_images(rows: Sequence[dict], jsonl: str | Path, key: str,
                image_size: int | None) -> torch.Tensor:
    """(N, 3, H, W) pixels in [-1, 1] of each row's `key` image (resized to image_size)."""
    return torch.stack([load_pixels(resolve_image(r[key], jsonl), image_size) for r in rows])


@torch.no_grad()
def predict(model: AttributeClassifier, pixels: torch.Tensor,
            batch_size: int = 256) -> list[dict[str, dict | None]]:
    """Per image {cell: {"shape", "colour"} or None}; a cell is empty when its shape is none."""
    model.eval()
    scenes = []
    for s in range(0, len(pixels), batch_size):
        classes = [logits.argmax(-1) for logits in model(pixels[s:s + batch_size])]  # (B, cells)
        for i in range(len(classes[0])):
            scene = {}
            for k, cell in enumerate(model.vocab["cells"]):
                names = {a: model.vocab[a][int(c[i, k])] for a, c in zip(ATTRIBUTES, classes)}
                scene[cell] = None if names["shape"] == NONE else names
            scenes.append(scene)
    return scenes


def train(model: AttributeClassifier, pixels: torch.Tensor, targets: torch.Tensor,
          e: EvaluationConfig, generator: torch.Generator) -> list[float]:
    """Adam on the summed per-cell cross-entropies (xfusion.fit_heads). Generated images are
    noisier and softer than the rendered ones, so training images get Gaussian pixel noise of a
    random std up to `attr_augment_noise` and, with probability `attr_augment_blur`, a 3x3 box
    blur."""

    def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        blur = torch.rand(len(x), 1, 1, 1, generator=g) < e.attr_augment_blur
        x = torch.where(blur, F.avg_pool2d(x, 3, 1, 1, count_include_pad=False), x)
        std = e.attr_augment_noise * torch.rand(len(x), 1, 1, 1, generator=g)
        return x + std * torch.randn(x.shape, generator=g)

    model.train()
    losses = fit_heads(model, model.parameters(), pixels, targets, e.attr_steps,
                       e.attr_batch_size, e.attr_lr, generator, "attribute classifier", augment)
    model.eval()
    return losses


# --- scoring (shared with eval.geneval) ---------------------------------------------------------

def score(predicted: Sequence[dict], scenes: Sequence[dict], max_shapes: int) -> dict:
    """Attribute accuracies of predicted scenes against the true (prompt's) scene records.

    shape / colour / shape_colour: the primary object's, read at its cell; count: number of
    occupied cells; position: the set of occupied cells (the layout); objects: share of all
    objects whose shape and colour are right at their cell; anywhere: the primary object's shape
    and colour in some occupied cell (a right object drawn in a wrong place). `chance`: a uniform guess over the
    world's vocabulary (counts 1..max_shapes, layouts of that many cells); `majority`: the best
    constant guess on these scenes (the prior a blind classifier could reach)."""
    hits: dict[str, list[bool]] = {k: [] for k in ("shape", "colour", "shape_colour", "count",
                                                   "position", "objects", "anywhere")}
    truth: dict[str, list] = {k: [] for k in ("shape", "colour", "shape_colour", "count",
                                              "position")}
    for pred, scene in zip(predicted, scenes, strict=True):
        objs = scene["objects"]
        first = objs[0]
        at = pred.get(first["position"]) or {}
        ok = {a: at.get(a) == first[a] for a in ATTRIBUTES}
        layout = sorted(o["position"] for o in objs)
        hits["shape"].append(ok["shape"])
        hits["colour"].append(ok["colour"])
        hits["shape_colour"].append(ok["shape"] and ok["colour"])
        hits["anywhere"].append(any(v is not None and all(v.get(a) == first[a] for a in ATTRIBUTES)
                                    for v in pred.values()))
        hits["count"].append(sum(v is not None for v in pred.values()) == len(objs))
        hits["position"].append(sorted(c for c, v in pred.items() if v is not None) == layout)
        hits["objects"] += [(pred.get(o["position"]) or {}).get("shape") == o["shape"]
                            and (pred.get(o["position"]) or {}).get("colour") == o["colour"]
                            for o in objs]
        for key, value in (("shape", first["shape"]), ("colour", first["colour"]),
                           ("shape_colour", (first["shape"], first["colour"])),
                           ("count", len(objs)), ("position", tuple(layout))):
            truth[key].append(value)
    counts = range(1, min(max_shapes, len(POSITIONS)) + 1)
    chance = {"shape": 1 / len(SHAPES), "colour": 1 / len(COLOURS),
              "shape_colour": 1 / (len(SHAPES) * len(COLOURS)), "count": 1 / len(counts),
              "position": 1 / sum(math.comb(len(POSITIONS), n) for n in counts),
              "objects": 1 / (len(SHAPES) * len(COLOURS)),
              "anywhere": 1 / (len(SHAPES) * len(COLOURS))}
    majority = {k: Counter(v).most_common(1)[0][1] / len(v) for k, v in truth.items() if v}
    return {"accuracy": {k: sum(v) / len(v) if v else 0.0 for k, v in hits.items()},
            "chance": chance, "majority": majority, "n": len(scenes)}


# --- entry point --------------------------------------------------------------------------------

def read_scenes(path: str | Path) -> list[dict]:
    rows = read_jsonl(path)
    for row in rows:
        primary(row)  # every record has a scene whose first object matches its labels
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--train-scenes", required=True, help="R/world/train/scenes.jsonl")
    p.add_argument("--scenes", required=True, help="R/world/heldout/scenes.jsonl (quality)")
    p.add_argument("--out", required=True, type=Path, help="R/attribute_classifier")
    args = p.parse_args(argv)
    cfg = load_run(args.config)
    e = cfg.evaluation
    torch.manual_seed(cfg.seed)
    vocab = world_vocab()
    data = {}
    for split, path in (("train", args.train_scenes), ("heldout", args.scenes)):
        rows = read_scenes(path)
        data[split] = (rows, load_images(rows, path, "image", cfg.data.image_size))
    rows, pixels = data["train"]
    targets = torch.stack([cell_targets(r["scene"], vocab) for r in rows])  # (N, cells, attrs)
    model = AttributeClassifier(vocab, e.attr_width)
    start = time.perf_counter()
    losses = train(model, pixels, targets, e, torch.Generator().manual_seed(cfg.seed))
    seconds = time.perf_counter() - start
    rows, pixels = data["heldout"]
    quality = score(predict(model, pixels), [r["scene"] for r in rows], cfg.data.max_shapes)
    quality |= {"n_train": len(data["train"][0]), "steps": e.attr_steps,
                "parameters": sum(p.numel() for p in model.parameters()),
                "train_seconds": round(seconds, 1),
                "final_loss": sum(losses[-20:]) / max(1, len(losses[-20:])),
                "trained_on": str(args.train_scenes), "measured_on": str(args.scenes)}
    with atomic_dir(args.out) as tmp:
        model.save(tmp)
        atomic_write_json(tmp / "quality.json", quality)
    acc = quality["accuracy"]
    print(f"attribute classifier -> {args.out}: held-out primary shape+colour "
          f"{acc['shape_colour']:.3f} (chance {quality['chance']['shape_colour']:.3f}), "
          f"count {acc['count']:.3f}, layout {acc['position']:.3f}")
    return quality


if __name__ == "__main__":
    main()
