"""Data stage helpers shared by the world generator, the folder reader, the captioner and the
latent encoder: image paths in jsonl records, PNG I/O, and the bad-input policy."""

from __future__ import annotations

import io
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from xfusion.io import atomic_path, atomic_write_json


def resolve_image(image: str, jsonl_path: str | Path) -> Path:
    """The file behind a record's `image` field.

    Records hold absolute paths or paths relative to the results dir `R` (so that the same seed
    gives byte-identical files wherever `R` lives). `R` is an ancestor of the jsonl file
    (`R/world/<split>/scenes.jsonl`, `R/captions/<split>.jsonl`): the nearest ancestor under which
    the path exists wins.
    """
    path = Path(image)
    if path.is_absolute():
        return path
    for parent in Path(jsonl_path).resolve().parents:
        if (parent / path).exists():
            return parent / path
    raise FileNotFoundError(f"{jsonl_path}: image {image!r} not found under any parent directory; "
                            "rerun the data stage or fix the record's path")


def save_png(img: Image.Image, target: str | Path) -> None:
    """Atomic PNG write without metadata (no timestamps), so equal pixels give equal bytes."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    with atomic_path(target) as tmp:
        tmp.write_bytes(buf.getvalue())


def load_pixels(path: str | Path, image_size: int | None = None) -> torch.Tensor:
    """An RGB image as a (3, H, W) float tensor in [-1, 1] (the codec's input range)."""
    with Image.open(path) as img:
        img = img.convert("RGB")
        if image_size is not None and img.size != (image_size, image_size):
            raise ValueError(f"{path}: size {img.size}, expected {image_size}x{image_size}; "
                             "rerun the data stage with this config")
        arr = np.asarray(img, dtype=np.float32)  # (H, W, 3) in [0, 255]
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0  # (3, H, W)


@dataclass
class BadInputs:
    """Counts corrupt images and empty/missing captions under `data.bad_input_policy`.

    `skip`: record and continue, then `finish` prints the counts and writes a report;
    `stop`: the first bad input exits non-zero with a message naming the file."""

    policy: str
    items: list[dict] = field(default_factory=list)

    def add(self, file: str | Path, reason: str) -> None:
        if self.policy == "stop":
            sys.exit(f"bad input {file}: {reason} (data.bad_input_policy = stop; fix or remove "
                     "the file, or set data.bad_input_policy: skip)")
        self.items.append({"file": str(file), "reason": reason})

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for item in self.items:
            kind = item["reason"].split(":")[0]
            out[kind] = out.get(kind, 0) + 1
        return out

    def finish(self, report: str | Path) -> None:
        counts = self.counts()
        atomic_write_json(report, {"policy": self.policy, "n_bad": len(self.items),
                                   "counts": counts, "items": self.items})
        if self.items:
            print(f"skipped {len(self.items)} bad inputs {counts}; see {report}", file=sys.stderr)
