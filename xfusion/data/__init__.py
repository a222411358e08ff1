"""Data stage helpers shared by the world generator, the folder reader, the captioner and the
latent encoder: image paths in jsonl records, PNG I/O, and the bad-input policy.

Bad inputs (`data.bad_input_policy`): every stage that reads user data reads it with one
`BadInputs` through `read_records` (jsonl lines), `captioned_records` (captions) and
`read_image` / `record_image` (image files). A bad item is an undecodable or incomplete jsonl
line (not UTF-8, not a JSON object, a key missing), a missing, corrupt or truncated image, or an
empty caption. `skip` leaves it out, names it (file, and line for a jsonl line) in the stage's
report and continues; `stop` exits at the first one, naming it and the config key. The report
is `report_path(<stage output>)`: `<stem>.bad_inputs.json` beside the stage's output file or
directory (caption, tokenizer, latents, T2I sampling, metrics), except the folder reader's,
`bad_inputs.json` inside the world directory it fills."""

from __future__ import annotations

import io
import json
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


# What a file that is not a whole image raises in PIL: OSError ("image file is truncated",
# UnidentifiedImageError), SyntaxError ("broken PNG file"), ValueError, a decompression bomb.
IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def decode_image(path: str | Path) -> Image.Image:
    """The RGB image at `path`, decoded now: a truncated file fails here, not in a later step."""
    with Image.open(path) as img:
        img.load()
        return img.convert("RGB")


def to_pixels(img: Image.Image, path: str | Path, image_size: int | None = None) -> torch.Tensor:
    """An RGB image as a (3, H, W) float tensor in [-1, 1] (the codec's input range)."""
    if image_size is not None and img.size != (image_size, image_size):
        raise ValueError(f"{path}: size {img.size}, expected {image_size}x{image_size}; "
                         "rerun the data stage with this config")
    arr = np.asarray(img, dtype=np.float32)  # (H, W, 3) in [0, 255]
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0  # (3, H, W)


def load_pixels(path: str | Path, image_size: int | None = None) -> torch.Tensor:
    """`to_pixels` of the image at `path`."""
    return to_pixels(decode_image(path), path, image_size)


@dataclass
class BadInputs:
    """Bad inputs of one stage under `data.bad_input_policy` (module docstring).

    `skip`: `add` records the item and returns, then `finish` prints the counts and writes the
    report; `stop`: the first `add` exits non-zero with a message naming the file (and line)."""

    policy: str
    items: list[dict] = field(default_factory=list)

    def add(self, file: str | Path, reason: str, line: int | None = None) -> None:
        where = f"{file}:{line}" if line is not None else str(file)
        if self.policy == "stop":
            sys.exit(f"bad input {where}: {reason} (data.bad_input_policy = stop; fix or remove "
                     "it, or set data.bad_input_policy: skip)")
        item = {"file": str(file), "reason": reason}
        self.items.append(item if line is None else {**item, "line": line})

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for item in self.items:
            kind = item["reason"].split(":")[0]
            out[kind] = out.get(kind, 0) + 1
        return out

    def finish(self, report: str | Path, extra: dict | None = None) -> None:
        """Write the report (`extra`: more keys, e.g. a gathered split's `per_shard`)."""
        counts = self.counts()
        atomic_write_json(report, {"policy": self.policy, "n_bad": len(self.items),
                                   "counts": counts, "items": self.items, **(extra or {})})
        if self.items:
            print(f"skipped {len(self.items)} bad inputs {counts}; see {report}", file=sys.stderr)


def report_path(out: str | Path, is_dir: bool = False) -> Path:
    """Where a stage writing `out` reports its bad inputs: inside `out` (`is_dir`: the folder
    reader's world dir) or beside it (module docstring)."""
    out = Path(out)
    return out / "bad_inputs.json" if is_dir else out.with_name(out.stem + ".bad_inputs.json")


def read_records(path: str | Path, bad: BadInputs, keys: tuple[str, ...] = (),
                 lines: range | None = None) -> list[tuple[int, dict]]:
    """(line number, record) of each line of the jsonl at `path` that is a UTF-8 JSON object
    holding `keys`; any other non-blank line is a bad input named by its line. `lines`: only
    these (1-based) line numbers are read (one shard's, xfusion.shards), the others passed over."""
    records = []
    with open(path, "rb") as fh:  # bytes: one undecodable line must not hide the others
        for n, raw in enumerate(fh, start=1):
            if lines is not None and n not in lines:
                if n >= lines.stop:
                    break
                continue
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                row = json.loads(line)
            except ValueError as err:  # UnicodeDecodeError, json.JSONDecodeError
                bad.add(path, f"undecodable line: {err}", line=n)
                continue
            missing = [k for k in keys if not isinstance(row, dict) or k not in row]
            if missing:
                bad.add(path, f"incomplete record: no {missing[0]!r}", line=n)
                continue
            records.append((n, row))
    return records


def caption_text(caption: object) -> str | None:
    """The caption if it is a non-blank string, else None (an empty caption)."""
    return caption if isinstance(caption, str) and caption.strip() else None


def captioned_records(path: str | Path, bad: BadInputs,
                      keys: tuple[str, ...] = ()) -> list[tuple[int, dict]]:
    """`read_records` of the records holding `keys` and a non-empty `caption`; an empty caption
    is a bad input named by its line."""
    records = []
    for line, row in read_records(path, bad, keys=("caption", *keys)):
        if caption_text(row["caption"]) is None:
            bad.add(path, "empty caption", line=line)
        else:
            records.append((line, row))
    return records


def records_by_id(path: str | Path, keys: tuple[str, ...] = ()) -> dict[str, dict]:
    """The records of a data stage's jsonl by `id`, for a reader that takes its ids from the
    latents: lines that do not decode are passed over, since the stages upstream of the latents
    (caption reads the scenes, latents the captions) named them and left them out, or stopped."""
    return {row["id"]: row for _, row in read_records(path, BadInputs("skip"), ("id", *keys))}


def read_image(path: str | Path, bad: BadInputs, named_at: str | None = None
               ) -> Image.Image | None:
    """The decoded RGB image at `path`, or None when it is missing or not a whole image: a bad
    input (`named_at`: the jsonl line naming it, reported with it)."""
    try:
        return decode_image(path)
    except IMAGE_ERRORS as err:
        kind = "missing image" if isinstance(err, FileNotFoundError) else "corrupt image"
        bad.add(path, f"{kind}: {err}" + (f" (named at {named_at})" if named_at else ""))
        return None


def record_image(row: dict, jsonl: str | Path, line: int, bad: BadInputs,
                 key: str = "image") -> Image.Image | None:
    """`read_image` of the file a record at `jsonl:line` names in `row[key]`."""
    try:
        path = resolve_image(row[key], jsonl)
    except FileNotFoundError:
        bad.add(jsonl, f"missing image: {row[key]!r} is not under any parent directory", line=line)
        return None
    return read_image(path, bad, named_at=f"{jsonl}:{line}")
