"""Figure A of the X-Fusion supplement at our scale: per-task metrics before and after fine-tuning
on the four downstream tasks (Supp. B.1), and a qualitative panel.

    python -m eval.figure_a --before R/finetune_scores/RUN/before.json \
        --after R/finetune_scores/RUN/after.json --tasks R/tasks/heldout/tasks.jsonl \
        --csv R/tables/figureA.csv --panel R/figures/figureA.png

CSV: one row per metric (eval.tasks.TASK_METRICS): `metric, task, before, after, change,
lower_is_better, n`. Panel: per task, its first held-out example after fine-tuning as
source | instruction or question | output | target (image, or the true answer as text); the
output column holds the model's image or its answer.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw

from eval.tasks import TASK_METRICS
from xfusion.data import decode_image, resolve_image
from xfusion.data.tasks import TASKS
from xfusion.io import atomic_path, atomic_write_text, read_jsonl

CELL = 128  # px per panel cell (the tiny images scaled up, nearest)
COLUMNS = ("source", "instruction", "output", "target")


def table_rows(before: dict, after: dict) -> list[dict]:
    rows = []
    for metric, (task, lower) in TASK_METRICS.items():
        b, a = before["metrics"].get(metric), after["metrics"].get(metric)
        rows.append({"metric": metric, "task": task, "before": b, "after": a,
                     "change": None if a is None or b is None else a - b,
                     "lower_is_better": lower, "n": after["n"].get(task, 0)})
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in r.items()} for r in rows)
    atomic_write_text(path, buf.getvalue())


def text_cell(text: str) -> Image.Image:
    img = Image.new("RGB", (CELL, CELL), (255, 255, 255))
    ImageDraw.Draw(img).multiline_text((4, 4), "\n".join(textwrap.wrap(text, 20)[:9]),
                                       fill=(0, 0, 0))
    return img


def image_cell(path: str | Path) -> Image.Image:
    return decode_image(path).resize((CELL, CELL), Image.Resampling.NEAREST)


def panel(after: dict, tasks: list[dict], jsonl: Path) -> Image.Image:
    """One row per task with an example: source, prompt, output, target."""
    by_id = {r["id"]: r for r in tasks}
    firsts = {}
    for ex in after["examples"]:
        firsts.setdefault(ex["task"], ex)
    shown = [t for t in TASKS if t in firsts]
    header = CELL // 4  # the column names
    grid = Image.new("RGB", (len(COLUMNS) * CELL, header + len(shown) * CELL), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for c, name in enumerate(COLUMNS):
        draw.text((c * CELL + 4, 4), name, fill=(0, 0, 0))
    for k, task in enumerate(shown):
        ex, row = firsts[task], by_id[firsts[task]["id"]]
        y = header + k * CELL
        output = (image_cell(ex["output"]) if row["target"] else text_cell(ex["output"]))
        target = (image_cell(resolve_image(row["target"], jsonl)) if row["target"]
                  else text_cell(row["answer"]))
        cells = (image_cell(resolve_image(row["source"], jsonl)),
                 text_cell(f"[{task}] {row['prompt']}"), output, target)
        for c, cell in enumerate(cells):
            grid.paste(cell, (c * CELL, y))
    return grid


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", required=True, type=Path)
    p.add_argument("--after", required=True, type=Path)
    p.add_argument("--tasks", required=True, type=Path, help="R/tasks/heldout/tasks.jsonl")
    p.add_argument("--csv", required=True, type=Path)
    p.add_argument("--panel", required=True, type=Path)
    args = p.parse_args(argv)
    before, after = (json.loads(path.read_text()) for path in (args.before, args.after))
    rows = table_rows(before, after)
    write_csv(rows, args.csv)
    with atomic_path(args.panel) as tmp:
        panel(after, read_jsonl(args.tasks), args.tasks).save(tmp, format="PNG")
    return rows


if __name__ == "__main__":
    main()
