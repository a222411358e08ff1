"""Bad inputs for the data-policy tests (xfusion.data's `data.bad_input_policy`): a corrupt image,
a truncated image, an undecodable (non-UTF-8) jsonl line. Each writer returns the path or line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def write_png(path: Path, seed: int, size: tuple[int, int] = (32, 32)) -> Path:
    """A noise PNG (noise: it compresses little, so half its bytes cut off pixel rows)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="PNG")
    return path


def write_corrupt(path: Path) -> Path:
    """A PNG signature followed by text: PIL cannot identify it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return path


def write_truncated(path: Path, size: tuple[int, int] = (32, 32)) -> Path:
    """A whole PNG's header and the first half of its pixel data: it opens, then fails to
    decode with `OSError: image file is truncated`."""
    data = write_png(path, seed=99, size=size).read_bytes()
    path.write_bytes(data[:len(data) // 2])
    return path


def undecodable_line(record: dict) -> bytes:
    """`record` as a jsonl line with a Latin-1 byte (0xE9) inside a string: not UTF-8."""
    return json.dumps(record).encode().replace(b"CAFE", b"caf\xe9") + b"\n"


KINDS = ("corrupt image", "truncated image", "empty caption", "undecodable line")


def report_items(report: Path) -> set[tuple[str, int | None, str]]:
    """(file name, line, kind) of each item of a bad-input report; checks its count."""
    data = json.loads(report.read_text())
    items = {(Path(i["file"]).name, i.get("line"), i["reason"].split(":")[0])
             for i in data["items"]}
    assert data["n_bad"] == len(data["items"]) == len(items)
    return items


def assert_stops_naming(run, where: str) -> str:
    """`run()` under `stop` exits with a message naming `where` and the config key."""
    try:
        run()
    except SystemExit as exc:
        message = str(exc.code)
    else:
        raise AssertionError(f"no stop at the bad input {where}")
    assert f"bad input {where}" in message and "data.bad_input_policy" in message, message
    return message


def write_image_of(kind: str, path: Path, size: tuple[int, int] = (32, 32)) -> Path:
    """The image of a bad input of `kind`: corrupt, truncated, else a whole one."""
    if kind == "corrupt image":
        return write_corrupt(path)
    if kind == "truncated image":
        return write_truncated(path, size)
    return write_png(path, seed=9, size=size)


def jsonl_with(rows: list[dict], record: dict, kind: str) -> bytes:
    """`rows` as jsonl with `record` as line 3, written undecodable for that kind of input."""
    lines = [json.dumps(r).encode() + b"\n" for r in rows]
    lines.insert(2, undecodable_line(record) if kind == "undecodable line"
                 else json.dumps(record).encode() + b"\n")
    return b"".join(lines)
