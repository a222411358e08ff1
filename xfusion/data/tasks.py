"""Downstream task data (X-Fusion Supp. B.1, Fig. A): editing, localisation, in/out-painting and
visual question answering, for fine-tuning one model on all four at once.

Tiny scale: every example is made from a tiny-world scene record (xfusion.data.world), so its
ground truth is exact: an edit's target is the edited scene rendered again, a box is the object's
drawn extent, a painting target is the unmasked image, a VQA answer is read off the record.

    python -m xfusion.data.tasks --config C --world R/world --out R/tasks
    python -m xfusion.data.tasks --config C --folder DIR --out R/tasks    (paper scale)

writes `R/tasks/{train,heldout}/tasks.jsonl` and `R/tasks/<split>/images/<id>.png` (edit targets
and masked painting sources; other sources are the world's own images). One record per line:

    {"id", "task", "scene_id", "source": image path, "prompt": text, "target": image path or
     null, "answer": text or null, "truth": {...}}

`task` is one of TASKS; `source`/`target` paths are R-relative as the world's (resolve_image).
  editing       prompt "make the red circle blue" / "turn the red circle into a square";
                target: the edited scene; truth {"object", "attribute", "from", "to", "cell",
                "scene": the edited scene}
  localisation  prompt "where is the red circle?"; answer the box as text (BOX_FORMAT:
                "x0 y0 x1 y1", integer pixels of the source image, x right, y down, x1/y1
                exclusive); truth {"object", "box": [x0, y0, x1, y1]}
  painting      source: the image with a region filled with MASK_FILL; prompt INPAINT/OUTPAINT
                + the scene's caption; target: the full image; truth {"kind": "inpaint" |
                "outpaint", "mask": [x0, y0, x1, y1] (the masked box; outpaint: the kept box)}
  vqa           prompt a question; answer a short text; truth {"kind": "attribute" | "count" |
                "relation"} (relation needs two objects: scenes of one shape get none)
Each scene of a split gives one example of every task it supports, ids `<scene id>-<task>`.
Same seed -> byte-identical files; splits follow the world's (train, heldout).

Paper scale (`finetune.task_dir`): DIR/<split>/tasks.jsonl in the same layout, image paths
relative to that jsonl (or absolute), `truth` optional (painting needs its `mask`); the rule
checks every record and writes the same files with absolute image paths.

References: X-Fusion Supp. B.1 and Fig. A/C (four tasks, one model); Transfusion Sec. 4.4
(image editing as image-conditioned generation).
"""

from __future__ import annotations

import argparse
import math
import random
from pathlib import Path

from PIL import Image, ImageDraw
from tqdm import tqdm

from xfusion.caption import scene_caption
from xfusion.config import load_run
from xfusion.data import decode_image, resolve_image, save_png
from xfusion.data.world import COLOURS, NUMBER_WORDS, POSITIONS, SHAPES, SIZES, relation, render
from xfusion.io import atomic_write_jsonl, read_jsonl

TASKS = ("editing", "localisation", "painting", "vqa")
IMAGE_TASKS = ("editing", "painting")  # image-conditioned image generation (layout "i2i")
TEXT_TASKS = ("localisation", "vqa")  # image + question -> text (layout "vqa")
SPLITS = ("train", "heldout")
MASK_FILL = (128, 128, 128)  # painting's masked pixels: no colour or background of the world
INPAINT = "fill in the grey region."
OUTPAINT = "extend the image beyond the grey border."
BOX_FORMAT = "x0 y0 x1 y1"  # the localisation answer: integer pixels, x1/y1 exclusive


# --- geometry -----------------------------------------------------------------------------------

def object_box(obj: dict, image_size: int) -> list[int]:
    """The pixel box [x0, y0, x1, y1) that holds the drawn object: every shape of the world fits
    the square of side 2r around its centre (world.render), widened to whole pixels."""
    fx, fy = POSITIONS[obj["position"]]
    r = SIZES[obj["size"]]
    return [max(0, math.floor((fx - r) * image_size)), max(0, math.floor((fy - r) * image_size)),
            min(image_size, math.ceil((fx + r) * image_size)),
            min(image_size, math.ceil((fy + r) * image_size))]


def format_box(box: list[int]) -> str:
    return " ".join(str(int(v)) for v in box)


def parse_box(text: str) -> list[float] | None:
    """The first four numbers of `text` as a box, or None when there are fewer (a wrong
    answer, not an error: the model's output is free text)."""
    numbers = []
    for word in text.replace(",", " ").replace("[", " ").replace("]", " ").split():
        try:
            numbers.append(float(word))
        except ValueError:
            continue
    return numbers[:4] if len(numbers) >= 4 else None


def mask_image(img: Image.Image, box: list[int], outside: bool) -> Image.Image:
    """`img` with `box` (outside=False) or everything but `box` (outside=True) set to MASK_FILL."""
    out = img.copy()
    if outside:
        fill = Image.new("RGB", img.size, MASK_FILL)
        fill.paste(img.crop(box), box[:2])
        return fill
    ImageDraw.Draw(out).rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=MASK_FILL)
    return out


# --- names --------------------------------------------------------------------------------------

def name(obj: dict) -> str:
    return f"{obj['colour']} {obj['shape']}"


def unique_objects(scene: dict) -> list[int]:
    """Objects that "the <colour> <shape>" names unambiguously in their scene."""
    names = [name(o) for o in scene["objects"]]
    return [i for i, n in enumerate(names) if names.count(n) == 1]


# --- the four generators, each (scene, rng) -> fields of one record or None ---------------------

def editing(scene: dict, rng: random.Random) -> dict | None:
    choices = unique_objects(scene)
    if not choices:
        return None
    i = rng.choice(choices)
    obj = scene["objects"][i]
    attribute = rng.choice(("colour", "shape"))
    pool = list(COLOURS) if attribute == "colour" else list(SHAPES)
    new = rng.choice([v for v in pool if v != obj[attribute]])
    edited = {"objects": [dict(o) for o in scene["objects"]], "relations": scene["relations"]}
    edited["objects"][i][attribute] = new
    prompt = (f"make the {name(obj)} {new}." if attribute == "colour"
              else f"turn the {name(obj)} into a {new}.")
    return {"prompt": prompt, "truth": {"object": i, "attribute": attribute,
                                        "from": obj[attribute], "to": new,
                                        "cell": obj["position"], "scene": edited}}


def localisation(scene: dict, rng: random.Random, image_size: int) -> dict | None:
    choices = unique_objects(scene)
    if not choices:
        return None
    i = rng.choice(choices)
    box = object_box(scene["objects"][i], image_size)
    return {"prompt": f"where is the {name(scene['objects'][i])}?", "answer": format_box(box),
            "truth": {"object": i, "box": box}}


def painting(scene: dict, rng: random.Random, image_size: int, image_id: str) -> dict:
    """Inpainting masks one object's box; outpainting keeps the central half of the image."""
    caption = scene_caption(image_id, scene)
    if rng.random() < 0.5:
        box = object_box(rng.choice(scene["objects"]), image_size)
        return {"prompt": f"{INPAINT} {caption}", "truth": {"kind": "inpaint", "mask": box}}
    q = image_size // 4
    return {"prompt": f"{OUTPAINT} {caption}",
            "truth": {"kind": "outpaint", "mask": [q, q, image_size - q, image_size - q]}}


def vqa(scene: dict, rng: random.Random) -> dict:
    objects = scene["objects"]
    kinds = ["attribute", "count"] + (["relation"] if scene["relations"] else [])
    kind = rng.choice(kinds)
    if kind == "count":
        return {"prompt": "how many shapes are there?", "answer": NUMBER_WORDS[len(objects)],
                "truth": {"kind": kind}}
    if kind == "relation":
        rel = rng.choice(scene["relations"])
        s, o = objects[rel["subject"]], objects[rel["object"]]
        return {"prompt": f"where is the {name(s)} relative to the {name(o)}?",
                "answer": relation(s["position"], o["position"]), "truth": {"kind": kind}}
    obj = rng.choice(objects)
    if rng.random() < 0.5:
        return {"prompt": f"what colour is the {obj['shape']} at the {obj['position']}?",
                "answer": obj["colour"], "truth": {"kind": kind}}
    return {"prompt": f"what shape is the {obj['colour']} object at the {obj['position']}?",
            "answer": obj["shape"], "truth": {"kind": kind}}


# --- a split ------------------------------------------------------------------------------------

def world_split(world: Path, out: Path, split: str, image_size: int, seed: int) -> list[dict]:
    """The task records of one world split, images written under out/<split>/images."""
    rng = random.Random(f"tasks-{seed}-{split}")  # str seeds hash with sha512: stable
    rows = []
    for rec in tqdm(read_jsonl(world / split / "scenes.jsonl"), desc=f"tasks {split}",
                    unit="scene"):
        scene, sid = rec["scene"], rec["id"]
        if scene is None:
            raise SystemExit(f"{world / split / 'scenes.jsonl'}: record {sid} has no scene; "
                             "task data from images alone needs --folder (finetune.task_dir)")
        image_dir = out / split / "images"
        rel = f"{out.name}/{split}/images"
        base = {"scene_id": sid, "source": rec["image"], "target": None, "answer": None}
        made = {"editing": editing(scene, rng),
                "localisation": localisation(scene, rng, image_size),
                "painting": painting(scene, rng, image_size, sid), "vqa": vqa(scene, rng)}
        for task in TASKS:
            fields = made[task]
            if fields is None:
                continue
            row = {**base, "id": f"{sid}-{task}", "task": task, **fields}
            if task == "editing":
                save_png(render(fields["truth"]["scene"], image_size), image_dir / f"{row['id']}.png")
                row["target"] = f"{rel}/{row['id']}.png"
            elif task == "painting":
                img = decode_image(resolve_image(rec["image"], world / split / "scenes.jsonl"))
                masked = mask_image(img, fields["truth"]["mask"],
                                    outside=fields["truth"]["kind"] == "outpaint")
                save_png(masked, image_dir / f"{row['id']}.png")
                row["source"], row["target"] = f"{rel}/{row['id']}.png", rec["image"]
            rows.append(row)
    return rows


def check_folder_record(row: dict, jsonl: Path, line: int) -> dict:
    """A user's task record, checked, with its image paths made absolute."""
    where = f"{jsonl}:{line}"
    for key in ("id", "task", "source", "prompt"):
        if not row.get(key):
            raise SystemExit(f"{where}: missing {key!r} (layout: docs/INTERFACES.md, Tasks)")
    if row["task"] not in TASKS:
        raise SystemExit(f"{where}: task {row['task']!r} must be one of {', '.join(TASKS)}")
    need = "target" if row["task"] in IMAGE_TASKS else "answer"
    if not row.get(need):
        raise SystemExit(f"{where}: a {row['task']} record needs {need!r}")
    if row["task"] == "painting" and "mask" not in (row.get("truth") or {}):
        raise SystemExit(f"{where}: a painting record needs truth.mask [x0, y0, x1, y1]")
    out = {"scene_id": None, "target": None, "answer": None, "truth": {}, **row}
    for key in ("source", "target"):
        if out[key]:
            path = Path(out[key]) if Path(out[key]).is_absolute() else jsonl.parent / out[key]
            if not path.is_file():
                raise SystemExit(f"{where}: {key} image {out[key]} not found (paths are relative "
                                 "to the jsonl's directory, or absolute)")
            out[key] = str(path.resolve())
    return out


def folder_split(folder: Path, split: str) -> list[dict]:
    jsonl = folder / split / "tasks.jsonl"
    if not jsonl.is_file():
        raise SystemExit(f"{jsonl}: missing; finetune.task_dir needs <dir>/{{train,heldout}}/"
                         "tasks.jsonl (docs/INTERFACES.md, Tasks)")
    return [check_folder_record(r, jsonl, i) for i, r in enumerate(read_jsonl(jsonl), start=1)]


def generate_tasks(out: Path, image_size: int, seed: int, world: Path | None = None,
                   folder: Path | None = None) -> dict[str, list[dict]]:
    if (world is None) == (folder is None):
        raise ValueError("generate_tasks: give exactly one of world and folder")
    splits = {}
    for split in SPLITS:
        rows = (world_split(world, out, split, image_size, seed) if world is not None
                else folder_split(folder, split))
        atomic_write_jsonl(out / split / "tasks.jsonl", rows)
        splits[split] = rows
    return splits


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="config/<scale>.yaml")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--world", type=Path, help="R/world (tiny: from its scene records)")
    source.add_argument("--folder", type=Path, help="finetune.task_dir (paper: user task folders)")
    p.add_argument("--out", required=True, type=Path, help="R/tasks")
    args = p.parse_args(argv)
    cfg = load_run(args.config)
    splits = generate_tasks(args.out, cfg.data.image_size, cfg.seed, args.world, args.folder)
    counts = {s: {t: sum(r["task"] == t for r in rows) for t in TASKS} for s, rows in splits.items()}
    print(f"wrote task data to {args.out}: {counts}")


if __name__ == "__main__":
    main()
