"""Paper-scale data: an image folder (COCO train2017 and the like) in the world's layout.

`python -m xfusion.data.folder --config config/paper.yaml --out results/paper/world` reads every
jpg/png under `data.image_dir` (recursively), centre-crops and resizes each to `data.image_size`,
and writes `{train,heldout}/images/<id>.png` + `scenes.jsonl` like `xfusion.data.world`, with
`scene` and `labels` null. The split is deterministic: files sorted by path, shuffled with the
config seed; the first `n_heldout` readable images are held out, the next up to `n_train` train.

`short_caption` (a human reference caption, the "short caption" of Supp. Fig. E) comes from,
when present, `captions.jsonl` in `data.image_dir` (`{"file": <path relative to image_dir>,
"caption": str}` per line) or COCO `captions_*.json` in `data.image_dir`, its parent or
`<parent>/annotations` (the first caption of each image); else it is null.

Bad inputs (xfusion.data: missing, corrupt or truncated images; undecodable lines of
`captions.jsonl` or an undecodable COCO file; empty or missing captions where a caption source
exists) follow `data.bad_input_policy`: `skip` leaves them out, names each (file, line) in
`<out>/bad_inputs.json` and prints the counts; `stop` exits non-zero naming the first.

References: X-Fusion Sec. 4 (256 px images); COCO captions annotation format.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from xfusion.config import ConfigError, load_run
from xfusion.data import BadInputs, caption_text, read_image, read_records, report_path, save_png
from xfusion.io import atomic_write_jsonl

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def find_images(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def load_captions(root: Path, bad: BadInputs) -> dict[str, tuple[str | None, str]] | None:
    """{path relative to root (or COCO file name): (caption or None if empty, where it is
    given)}, or None if there is no source. Undecodable lines or files are bad inputs."""
    if (root / "captions.jsonl").exists():
        path = root / "captions.jsonl"
        return {r["file"]: (caption_text(r.get("caption")), f"{path}:{n}")
                for n, r in read_records(path, bad, keys=("file",))}
    for folder in (root, root.parent, root.parent / "annotations"):
        files = sorted(folder.glob("captions_*.json"))
        if files:
            captions: dict[str, tuple[str | None, str]] = {}
            for file in files:
                try:
                    coco = json.loads(file.read_bytes().decode("utf-8"))
                    names = {im["id"]: im["file_name"] for im in coco["images"]}
                    anns = [(names[a["image_id"]], a["caption"]) for a in coco["annotations"]]
                except (ValueError, KeyError, TypeError) as err:
                    bad.add(file, f"undecodable annotation file: {type(err).__name__}: {err}")
                    continue
                for name, caption in anns:
                    text = caption_text(caption)
                    captions.setdefault(name, (text and text.strip(), str(file)))
            return captions
    return None
def centre_crop_resize(img: Image.Image, size: int) -> Image.Image:
    img = img.convert("RGB")
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return img.crop((left, top, left + side, top + side)).resize(
        (size, size), Image.Resampling.BICUBIC)


def image_id(rel: Path) -> str:
    return rel.with_suffix("").as_posix().replace("/", "__")


def prepare_folder(image_dir: Path, out: Path, image_size: int, n_train: int, n_heldout: int,
                   seed: int, policy: str) -> dict[str, int]:
    """Write the world layout from `image_dir`; returns the number of images per split."""
    files = find_images(image_dir)
    if not files:
        raise ConfigError(f"config.data.image_dir = {str(image_dir)!r}: no jpg/png images found")
    random.Random(f"folder-{seed}").shuffle(files)
    bad = BadInputs(policy)
    captions = load_captions(image_dir, bad)
    rows: dict[str, list[dict]] = {"heldout": [], "train": []}
    for path in tqdm(files, desc="images", unit="img"):
        split = "heldout" if len(rows["heldout"]) < n_heldout else "train"
        if split == "train" and len(rows["train"]) >= n_train:
            break
        rel = path.relative_to(image_dir)
        caption = None
        if captions is not None:
            caption, where = captions.get(rel.as_posix(), captions.get(path.name, (None, None)))
            if caption is None:
                bad.add(path, f"empty caption: given at {where}" if where else
                        "missing caption: no caption for this image")
                continue
        if (img := read_image(path, bad)) is None:
            continue
        iid = image_id(rel)
        save_png(centre_crop_resize(img, image_size), out / split / "images" / f"{iid}.png")
        rows[split].append({"id": iid, "image": f"{out.name}/{split}/images/{iid}.png",
                            "scene": None, "labels": None, "short_caption": caption})
    for split, split_rows in rows.items():
        atomic_write_jsonl(out / split / "scenes.jsonl", split_rows)
    bad.finish(report_path(out, is_dir=True))
    return {split: len(r) for split, r in rows.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description="An image folder in the world's layout.")
    parser.add_argument("--config", required=True, help="config/paper.yaml")
    parser.add_argument("--out", required=True, type=Path, help="R/world")
    args = parser.parse_args()
    cfg = load_run(args.config)
    d = cfg.data
    if not d.image_dir:
        raise ConfigError("config.data.image_dir: the folder source needs an image directory")
    counts = prepare_folder(Path(d.image_dir), args.out, d.image_size, d.n_train, d.n_heldout,
                            cfg.seed, d.bad_input_policy)
    print(f"wrote {counts} images to {args.out}")


if __name__ == "__main__":
    main()
