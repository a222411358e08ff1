import json
import subprocess
import sys
from pathlib import Path

import torch
from PIL import Image

from xfusion.codec import build_codec
from xfusion.config import load_run
from xfusion.data import load_pixels
from xfusion.latents import load_latents, save_latents

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
