"""The COCO evaluation split (X-Fusion Sec. 4, "Task"): T2I from 30K randomly sampled MS-COCO
prompts (FID against COCO images, CLIP score), I2T captions of 30K COCO images (BLIP-2 ITM).

    python -m xfusion.data.coco --config C --train TRAIN_IMAGES --out R/world/coco

reads `data.eval.coco_annotations`, a file in the layout of COCO's `captions_val2014.json`
(`{"images": [{"id", "file_name", ...}], "annotations": [{"image_id", "id", "caption"}]}`), and
the images under `data.eval.coco_images` (`file_name` relative to it), and writes the `coco`
split in the layouts of the held-out split (docs/INTERFACES.md):
- `images/<id>.png`: centre-cropped and resized to `data.image_size` (FID's reference set);
- `scenes.jsonl`: `{"id", "image", "scene": null, "labels": null, "short_caption", "coco_id",
  "references"}`: `short_caption` is the image's sampled human caption, `references` its other
  human captions (Supp. Fig. E's BERTScore references);
- `prompts.jsonl`: `{"id", "image", "caption", "coco_id"}` (the captions layout): the sampled
  human caption of each image, the T2I prompts;
- `overlap.json`: the sampled COCO images that are also training images;
- `bad_inputs.json`: bad annotation entries and missing or corrupt images.

Sampling, seeded by the config's `seed`: the ids of the annotated images, sorted, are shuffled
with `random.Random("coco-<seed>")` and walked in that order; an image is kept unless it is a bad
input or overlaps the training images, until `evaluation.n_samples` are kept (a smaller
n_samples thus gives a prefix of a larger one). Each kept image's prompt is one of its captions
(in annotation-id order), chosen by `random.Random("coco-<seed>-<coco id>")`.

Overlap with the training images (`--train`: `data.image_dir` at folder source, the world's
train images otherwise; the whole folder, not only the images the folder reader keeps) is found
by COCO id (a training file named like COCO's, `000000391895.jpg` or
`COCO_train2014_000000391895.jpg`, with the id of the COCO image) or by content (equal sha256; a
file's hash is taken only when an evaluation image has its size). It follows
`data.bad_input_policy`: `skip` leaves the image out of the sample (the next one in the seeded
order takes its place) and names it in `overlap.json` (the bad-input report format, kinds
`overlap (same COCO id)`, `overlap (same file, sha256)`); `stop` exits at the first, naming both
files. COCO train2017 holds most of val2014, so training on it and evaluating on val2014 leaves
about 5K clean images: fewer than n_samples usable images is an error naming the counts.

Bad inputs (xfusion.data): an annotation file that is not a COCO captions JSON stops the job
under either policy (there is nothing to evaluate); an image or annotation entry lacking a key
(`incomplete record`), an empty caption, an image without a caption (`missing caption`), a
missing or corrupt image follow `data.bad_input_policy` (`skip`: reported by entry in
`bad_inputs.json`, the next image takes a bad image's place; `stop`: exit at the first).

References: Lin et al., "Microsoft COCO: Common Objects in Context", ECCV 2014 (the captions
annotation format); X-Fusion Sec. 4 and Supp. C.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from xfusion.config import ConfigError, load_run
from xfusion.data import BadInputs, caption_text, read_image, save_png
from xfusion.data.folder import centre_crop_resize, find_images, image_id
from xfusion.io import atomic_write_jsonl

# COCO's file names: 2017 splits `000000391895.jpg`, 2014 splits `COCO_val2014_000000391895.jpg`
COCO_NAME = re.compile(r"^(?:COCO_[A-Za-z]+\d{4}_)?(\d{12})$")


@dataclass(frozen=True)
class CocoImage:
    coco_id: int
    file_name: str
    captions: tuple[str, ...]  # its non-empty human captions, in annotation-id order


def load_coco_json(path: Path) -> dict:
    """The annotation file as a mapping with `images` and `annotations` lists; anything else
    stops the job whatever the policy, as there is then no evaluation set."""
    try:
        coco = json.loads(path.read_bytes().decode("utf-8"))
    except ValueError as err:  # UnicodeDecodeError, json.JSONDecodeError
        raise SystemExit(f"{path}: not a COCO captions JSON ({err}); "
                         "config.data.eval.coco_annotations must name a captions_*.json file")
    if not (isinstance(coco, dict) and isinstance(coco.get("images"), list)
            and isinstance(coco.get("annotations"), list)):
        raise SystemExit(f"{path}: a COCO captions JSON has lists `images` and `annotations`; "
                         "config.data.eval.coco_annotations names something else")
    return coco


def read_annotations(path: Path, bad: BadInputs) -> dict[int, CocoImage]:
    """COCO id -> image with its captions; bad entries (module docstring) go to `bad`."""
    coco = load_coco_json(path)
    names: dict[int, str] = {}
    for i, im in enumerate(coco["images"]):
        if not (isinstance(im, dict) and isinstance(im.get("id"), int)
                and isinstance(im.get("file_name"), str)):
            bad.add(path, f"incomplete record: images[{i}] needs an integer 'id' and a "
                          "'file_name'")
            continue
        names[im["id"]] = im["file_name"]
    captions: dict[int, list[tuple[int, str]]] = defaultdict(list)
    for j, ann in enumerate(coco["annotations"]):
        if not (isinstance(ann, dict) and "image_id" in ann and "caption" in ann):
            bad.add(path, f"incomplete record: annotations[{j}] needs 'image_id' and 'caption'")
        elif ann["image_id"] not in names:
            bad.add(path, f"incomplete record: annotations[{j}]: image_id {ann['image_id']!r} "
                          "is no entry of images")
        elif (text := caption_text(ann["caption"])) is None:
            bad.add(path, f"empty caption: annotations[{j}] (image {ann['image_id']})")
        else:
            order = ann.get("id") if isinstance(ann.get("id"), int) else j
            captions[ann["image_id"]].append((order, " ".join(text.split())))
    out = {}
    for cid, name in names.items():
        if not captions[cid]:
            bad.add(path, f"missing caption: image {cid} ({name}) has no caption")
            continue
        out[cid] = CocoImage(cid, name, tuple(c for _, c in sorted(captions[cid])))
    return out


def sample_order(ids, seed: int) -> list[int]:
    """The COCO ids in the seeded order the sample is drawn in."""
    order = sorted(ids)
    random.Random(f"coco-{seed}").shuffle(order)
    return order


def choose_caption(image: CocoImage, seed: int) -> tuple[str, list[str]]:
    """(the prompt: one caption of the image, seeded; the image's other captions)."""
    k = random.Random(f"coco-{seed}-{image.coco_id}").randrange(len(image.captions))
    return image.captions[k], [c for i, c in enumerate(image.captions) if i != k]


def coco_id_of(path: Path) -> int | None:
    """The COCO id in a file named like COCO's images, else None."""
    match = COCO_NAME.match(path.stem)
    return int(match.group(1)) if match else None


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class TrainingImages:
    """The training images, indexed for overlap: by the COCO id in their names, and by size
    (a training file is hashed only when an evaluation image has its size, and once)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.by_id: dict[int, Path] = {}
        self.by_size: dict[int, list[Path]] = defaultdict(list)
        self._hashes: dict[Path, str] = {}
        for path in tqdm(find_images(root), desc="index training images", unit="img"):
            if (cid := coco_id_of(path)) is not None:
                self.by_id.setdefault(cid, path)
            self.by_size[path.stat().st_size].append(path)

    def _hash(self, path: Path) -> str:
        if path not in self._hashes:
            self._hashes[path] = sha256(path)
        return self._hashes[path]

    def overlap(self, path: Path, coco_id: int) -> str | None:
        """Why the COCO image `coco_id` at `path` is also a training image, or None."""
        if coco_id in self.by_id:
            return f"overlap (same COCO id): {coco_id} is also {self.by_id[coco_id]}"
        same_size = self.by_size.get(path.stat().st_size, [])
        if same_size:
            digest = sha256(path)
            for train in same_size:
                if self._hash(train) == digest:
                    return f"overlap (same file, sha256): {train}"
        return None


def write_split(annotations: Path, images_dir: Path, train_dir: Path, out: Path,
                image_size: int, n: int, seed: int, policy: str) -> int:
    """Write the coco split of `n` images to `out` (module docstring); returns n."""
    bad, overlap = BadInputs(policy), BadInputs(policy)
    images = read_annotations(annotations, bad)
    training = TrainingImages(train_dir)
    scenes, prompts = [], []
    with tqdm(total=n, desc="coco sample", unit="img") as bar:
        for cid in sample_order(images, seed):
            if len(scenes) == n:
                break
            image = images[cid]
            path = images_dir / image.file_name
            img = read_image(path, bad, named_at=f"{annotations}: image {cid}")
            if img is None:
                continue
            if (why := training.overlap(path, cid)) is not None:
                overlap.add(path, why)
                continue
            iid = image_id(Path(image.file_name))
            save_png(centre_crop_resize(img, image_size), out / "images" / f"{iid}.png")
            prompt, references = choose_caption(image, seed)
            rel = f"{out.parent.name}/{out.name}/images/{iid}.png"  # relative to R
            scenes.append({"id": iid, "image": rel, "scene": None, "labels": None,
                           "short_caption": prompt, "coco_id": cid, "references": references})
            prompts.append({"id": iid, "image": rel, "caption": prompt, "coco_id": cid})
            bar.update()
    bad.finish(out / "bad_inputs.json")
    overlap.finish(out / "overlap.json")
    if len(scenes) < n:
        raise SystemExit(
            f"{annotations}: only {len(scenes)} of evaluation.n_samples = {n} COCO images are "
            f"usable: {len(overlap.items)} are also training images ({train_dir}; "
            f"{out / 'overlap.json'}), {len(bad.items)} bad inputs ({out / 'bad_inputs.json'}). "
            "Train on a folder without the evaluation images, or lower evaluation.n_samples")
    kept = {f"{row['id']}.png" for row in scenes}
    for stale in (out / "images").glob("*.png"):  # an earlier sample's: FID reads every file
        if stale.name not in kept:
            stale.unlink()
    atomic_write_jsonl(out / "scenes.jsonl", scenes)
    atomic_write_jsonl(out / "prompts.jsonl", prompts)
    return len(scenes)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The COCO evaluation split.")
    parser.add_argument("--config", required=True, help="config/paper.yaml")
    parser.add_argument("--train", required=True, type=Path,
                        help="the training images checked for overlap: data.image_dir, or "
                             "R/world/train/images at world source")
    parser.add_argument("--out", required=True, type=Path, help="R/world/coco")
    args = parser.parse_args(argv)
    cfg = load_run(args.config)
    d = cfg.data
    if not d.eval.coco_annotations:
        raise ConfigError("config.data.eval.coco_annotations = None: set it (and "
                          "data.eval.coco_images) to evaluate on COCO")
    n = write_split(Path(d.eval.coco_annotations), Path(d.eval.coco_images), args.train,
                    args.out, d.image_size, cfg.evaluation.n_samples, cfg.seed,
                    d.bad_input_policy)
    print(f"wrote the coco split ({n} images) to {args.out}")


if __name__ == "__main__":
    main()
