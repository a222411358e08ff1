import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from bad_files import (KINDS, assert_stops_naming, jsonl_with, report_items, write_image_of,
                       write_png)
from xfusion.codec import build_codec
from xfusion.config import load_run
from xfusion.data import load_pixels
from xfusion.latents import encode_images, encode_split, load_latents, save_latents

REPO = Path(__file__).resolve().parents[1]


def test_save_load_round_trip_keeps_tensor_and_ids(tmp_path):
    latents = torch.randn(3, 48, 8, 8)
    save_latents(tmp_path / "l.safetensors", latents, ["a", "b", "c"], {"kind": "pixel_shuffle"})
    loaded, ids = load_latents(tmp_path / "l.safetensors")
    assert torch.equal(loaded, latents) and ids == ["a", "b", "c"]


def test_cli_encodes_captioned_images_in_order_and_decodes_back(tiny_config, tmp_path):
    config = tiny_config({"data.encode_batch_size": 2})
    rows = []
    for i in range(3):
        path = tmp_path / "world" / "train" / "images" / f"im{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), (60 * i, 100, 250 - 60 * i)).save(path)
        rows.append({"id": f"im{i}", "image": f"world/train/images/im{i}.png", "caption": "x"})
    captions = tmp_path / "captions" / "train.jsonl"
    captions.parent.mkdir()
    captions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "latents" / "train.safetensors"
    subprocess.run([sys.executable, "-m", "xfusion.latents", "--config", str(config),
                    "--captions", str(captions), "--out", str(out)], check=True, cwd=REPO)
    latents, ids = load_latents(out)
    assert ids == ["im0", "im1", "im2"] and latents.shape == (3, 48, 8, 8)
    codec = build_codec(load_run(config).model.codec)
    pixels = codec.decode(latents)
    for i in range(3):
        expected = load_pixels(tmp_path / "world" / "train" / "images" / f"im{i}.png")
        assert torch.allclose(pixels[i], expected, atol=1e-6)


def captions_with(root: Path, kind: str) -> tuple[Path, set, str]:
    """A captions file of four good images with one bad input of `kind` as its third record
    (tests/bad_files.py). Returns the file, the items a skip report must hold, and what a stop
    must name."""
    images = root / "world" / "train" / "images"
    rows = [{"id": f"a{i}", "image": str(write_png(images / f"a{i}.png", seed=i)),
             "caption": "x"} for i in range(4)]
    bad = {"id": "bad", "image": str(write_image_of(kind, images / "bad.png")),
           "caption": " " if kind == "empty caption" else "CAFE"}
    captions = root / "captions" / "train.jsonl"
    captions.parent.mkdir(parents=True)
    captions.write_bytes(jsonl_with(rows, bad, kind))
    if kind in ("corrupt image", "truncated image"):
        return captions, {("bad.png", None, "corrupt image")}, bad["image"]
    return captions, {("train.jsonl", 3, kind)}, f"{captions}:3"


@pytest.mark.parametrize("kind", KINDS)
def test_skip_leaves_bad_inputs_out_of_the_latents_and_names_them(tiny_config, tmp_path, kind):
    captions, expected, _ = captions_with(tmp_path, kind)
    cfg = load_run(tiny_config({"data.encode_batch_size": 3}))
    out = tmp_path / "latents" / "train.safetensors"
    assert encode_split(captions, out, cfg, torch.device("cpu")) == (4, 48, 8, 8)
    latents, ids = load_latents(out)
    assert ids == ["a0", "a1", "a2", "a3"]
    good = encode_images([captions.parent.parent / "world" / "train" / "images" / f"{i}.png"
                          for i in ids], build_codec(cfg.model.codec), cfg.data.image_size, 4,
                         torch.device("cpu"))
    assert torch.equal(latents, good)  # each id keeps its own image's latents
    assert report_items(tmp_path / "latents" / "train.bad_inputs.json") == expected


@pytest.mark.parametrize("kind", KINDS)
def test_stop_exits_at_the_bad_input_naming_it(tiny_config, tmp_path, kind):
    captions, _, where = captions_with(tmp_path, kind)
    cfg = load_run(tiny_config({"data.bad_input_policy": "stop"}))
    out = tmp_path / "latents" / "train.safetensors"
    assert_stops_naming(lambda: encode_split(captions, out, cfg, torch.device("cpu")), where)
    assert not out.exists()


def test_cli_names_a_truncated_image_under_stop(tiny_config, tmp_path):
    captions, _, where = captions_with(tmp_path, "truncated image")
    config = tiny_config({"data.bad_input_policy": "stop"})
    result = subprocess.run([sys.executable, "-m", "xfusion.latents", "--config", str(config),
                             "--captions", str(captions), "--out", str(tmp_path / "l.safetensors")],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 1 and f"bad input {where}" in result.stderr
    assert "image file is truncated" in result.stderr and "Traceback" not in result.stderr
