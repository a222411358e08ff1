import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from bad_files import (KINDS, assert_stops_naming, jsonl_with, report_items, write_image_of,
                       write_png)
from xfusion.data.folder import prepare_folder
from xfusion.io import read_jsonl

REPO = Path(__file__).resolve().parents[1]


def write_folder(root: Path, captions: bool = True) -> Path:
    """Six non-square PNGs (two in a subfolder), a corrupt PNG, an image with an empty caption."""
    images = root / "images"
    names = [f"a{i}.png" for i in range(4)] + ["sub/b0.png", "sub/b1.png", "empty.png"]
    for i, name in enumerate(names):
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (48 + 8 * i, 40), (30 * i, 80, 120)).save(images / name)
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    if captions:
        rows = [{"file": n, "caption": "" if n == "empty.png" else f"a photo {n}"}
                for n in names + ["corrupt.png"]]
        (images / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return images


def test_skip_policy_counts_bad_inputs_and_splits_the_rest(tmp_path):
    images = write_folder(tmp_path)
    out = tmp_path / "R" / "world"
    counts = prepare_folder(images, out, image_size=32, n_train=100, n_heldout=2, seed=0,
                            policy="skip")
    assert counts == {"heldout": 2, "train": 4}
    report = json.loads((out / "bad_inputs.json").read_text())
    assert report["n_bad"] == 2
    assert sorted(Path(i["file"]).name for i in report["items"]) == ["corrupt.png", "empty.png"]
    ids = []
    for split in ("train", "heldout"):
        for row in read_jsonl(out / split / "scenes.jsonl"):
            assert row["scene"] is None and row["labels"] is None
            assert row["short_caption"].startswith("a photo ")
            assert Image.open(out.parent / row["image"]).size == (32, 32)
            ids.append(row["id"])
    assert len(set(ids)) == 6 and "sub__b0" in ids


def test_split_is_deterministic_and_n_train_caps_train(tmp_path):
    images = write_folder(tmp_path, captions=False)
    a = prepare_folder(images, tmp_path / "a" / "world", 32, 3, 2, 0, "skip")
    b = prepare_folder(images, tmp_path / "b" / "world", 32, 3, 2, 0, "skip")
    assert a == b == {"heldout": 2, "train": 3}
    for split in ("train", "heldout"):
        rows_a = read_jsonl(tmp_path / "a" / "world" / split / "scenes.jsonl")
        rows_b = read_jsonl(tmp_path / "b" / "world" / split / "scenes.jsonl")
        assert rows_a == rows_b and all(r["short_caption"] is None for r in rows_a)


def test_coco_captions_json_gives_first_caption(tmp_path):
    images = write_folder(tmp_path, captions=False)
    names = sorted(p.name for p in images.glob("*.png"))
    coco = {"images": [{"id": i, "file_name": n} for i, n in enumerate(names)],
            "annotations": [{"image_id": i, "caption": f" first {n} "} for i, n in enumerate(names)]
            + [{"image_id": i, "caption": "second"} for i in range(len(names))]}
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "captions_train.json").write_text(json.dumps(coco))
    out = tmp_path / "R" / "world"
    prepare_folder(images, out, 32, 100, 1, 0, "skip")
    rows = read_jsonl(out / "train" / "scenes.jsonl") + read_jsonl(out / "heldout" / "scenes.jsonl")
    # sub/ files have no annotation and corrupt.png cannot be read: bad; the rest get caption 1
    assert all(r["short_caption"] == f"first {r['id']}.png" for r in rows) and len(rows) == 5


def test_stop_policy_exits_nonzero_naming_the_file(tiny_config, tmp_path):
    images = write_folder(tmp_path)
    (images / "empty.png").unlink()
    config = tiny_config({"data.source": "folder", "data.image_dir": str(images),
                          "data.bad_input_policy": "stop", "data.n_heldout": 1})
    result = subprocess.run([sys.executable, "-m", "xfusion.data.folder", "--config", str(config),
                             "--out", str(tmp_path / "R" / "world")], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert "corrupt.png" in result.stderr and "bad_input_policy" in result.stderr


def folder_with(root: Path, kind: str) -> tuple[Path, set, str]:
    """Four good images plus one bad input of `kind` (tests/bad_files.py) in an image folder
    with captions.jsonl. Returns the folder, the items a skip report must hold, and what a stop
    must name."""
    images = root / "images"
    rows = [{"file": write_png(images / f"a{i}.png", seed=i).name, "caption": f"a photo {i}"}
            for i in range(4)]
    write_image_of(kind, images / "bad.png")
    record = {"file": "bad.png", "caption": "" if kind == "empty caption" else "a photo CAFE"}
    (images / "captions.jsonl").write_bytes(jsonl_with(rows, record, kind))
    if kind == "undecodable line":  # the line, then its image, which now has no caption
        return images, {("captions.jsonl", 3, kind), ("bad.png", None, "missing caption")}, \
            f"{images / 'captions.jsonl'}:3"
    expected_kind = "corrupt image" if kind == "truncated image" else kind
    return images, {("bad.png", None, expected_kind)}, str(images / "bad.png")


@pytest.mark.parametrize("kind", KINDS)
def test_skip_reports_each_bad_input_by_file_and_line_and_keeps_the_rest(tmp_path, kind):
    images, expected, _ = folder_with(tmp_path, kind)
    out = tmp_path / "R" / "world"
    assert prepare_folder(images, out, 16, 100, 1, 0, "skip") == {"heldout": 1, "train": 3}
    assert report_items(out / "bad_inputs.json") == expected
    ids = {r["id"] for s in ("train", "heldout") for r in read_jsonl(out / s / "scenes.jsonl")}
    assert ids == {"a0", "a1", "a2", "a3"}
    if kind == "truncated image":
        reason = json.loads((out / "bad_inputs.json").read_text())["items"][0]["reason"]
        assert "truncated" in reason


@pytest.mark.parametrize("kind", KINDS)
def test_stop_exits_at_the_bad_input_naming_it(tmp_path, kind):
    images, _, where = folder_with(tmp_path, kind)
    out = tmp_path / "R" / "world"
    assert_stops_naming(lambda: prepare_folder(images, out, 16, 100, 1, 0, "stop"), where)
    assert not (out / "train" / "scenes.jsonl").exists()
