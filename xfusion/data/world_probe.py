"""The tiny world's probe set in ImageFolder layout, so that the tiny Supp. Fig. D reads its
labels through the same reader as ImageNet at paper scale (xfusion.data.image_folder).

`python -m xfusion.data.world_probe --train-scenes R/world/train/scenes.jsonl --val-scenes R/world/heldout/scenes.jsonl --out R/world/probe`
copies each image of the world's train split to `R/world/probe/train/<class>/<id>.png` and each
held-out one to `R/world/probe/val/<class>/<id>.png`; the class is the primary object's shape
(`labels.shape` of its scene record), the label the tiny probe has always reported. The bytes
are the world's own PNGs, so the probe set is as reproducible as the world.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tqdm import tqdm

from xfusion.data import records_by_id, resolve_image
from xfusion.io import atomic_path

CLASS_LABEL = "shape"  # the scene label that names an image's class folder


def write_split(scenes: Path, out: Path) -> dict[str, int]:
    """Copy the split's images into `out/<class>/`; returns the images per class."""
    counts: dict[str, int] = {}
    for image_id, row in tqdm(sorted(records_by_id(scenes, ("image", "labels")).items()),
                              desc=f"probe set {out.name}", unit="img"):
        label = (row["labels"] or {}).get(CLASS_LABEL)
        if label is None:
            raise SystemExit(f"{scenes}: record {image_id!r} has no labels.{CLASS_LABEL}; "
                             "rerun the world rule")
        with atomic_path(out / label / f"{image_id}.png") as tmp:
            tmp.write_bytes(resolve_image(row["image"], scenes).read_bytes())
        counts[label] = counts.get(label, 0) + 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-scenes", required=True, type=Path)
    parser.add_argument("--val-scenes", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path, help="R/world/probe")
    args = parser.parse_args()
    for split, scenes in (("train", args.train_scenes), ("val", args.val_scenes)):
        counts = write_split(scenes, args.out / split)
        print(f"{split}: {sum(counts.values())} images in {len(counts)} classes {counts}")


if __name__ == "__main__":
    main()
