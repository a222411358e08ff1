"""The tiny DiT's pretraining (x_fuse_dit's vision tower, X-Fusion Sec. 7.2): it learns, resumes
after a kill to the same weights, and its saved SD3Transformer2DModel loads into the tower."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import SD3Transformer2DModel
from safetensors.torch import load_file

from xfusion import pretrain_dit
from xfusion.config import apply_overrides, load_run, load_yaml
from xfusion.io import atomic_write_jsonl
from xfusion.latents import save_latents
from xfusion.model.dit import load_dit_json_
from xfusion.tokenizer import train_bpe

REPO = Path(__file__).resolve().parents[1]
SMALL = {
    # the pixel codec at downsample 2: 16x16 images <-> (12, 8, 8) latents
    "model.codec.latent_channels": 12,
    "model.codec.downsample": 2,
    "data.image_size": 16,
    "model.dit.tiny": {"num_layers": 3, "num_attention_heads": 2, "attention_head_dim": 8,
                       "joint_attention_dim": 12, "pooled_projection_dim": 10},
    "model.dit.pretrain_steps": 6,
    "model.dit.pretrain_batch_size": 4,
    "model.dit.pretrain_warmup_steps": 1,
    "training.checkpoint_every": 3,
    "training.log_every": 1,
}
CAPTIONS = ["a red circle", "a blue square at the top", "two green triangles", "a red square"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("dit")
    tok = train_bpe(CAPTIONS * 4, 300)
    tok.save_pretrained(root / "tokenizer")
    ids = [f"i{k}" for k in range(8)]
    g = torch.Generator().manual_seed(0)
    save_latents(root / "latents.safetensors", torch.randn(8, 12, 8, 8, generator=g), ids, {})
    atomic_write_jsonl(root / "captions.jsonl",
                       [{"id": i, "caption": CAPTIONS[k % 4]} for k, i in enumerate(ids)])
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(apply_overrides(load_yaml(REPO / "config" / "tiny.yaml"),
                                                     SMALL), sort_keys=False))
    return {"root": root, "config": config}


def run(data, out: Path) -> dict:
    cfg = load_run(data["config"], "x_fuse_dit")
    return pretrain_dit.pretrain(cfg, data["root"] / "tokenizer",
                                 data["root"] / "latents.safetensors",
                                 data["root"] / "captions.jsonl", out)


def test_a_killed_pretraining_resumes_to_the_same_weights(data, tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    run(data, whole)
    killed = tmp_path / "killed"
    steps = []
    real_save = pretrain_dit.checkpoint.save

    def save_then_die(ckpt_dir, step, **kw):  # the kill: right after the step-3 checkpoint
        real_save(ckpt_dir, step, **kw)
        steps.append(step)
        raise KeyboardInterrupt

    monkeypatch.setattr(pretrain_dit.checkpoint, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(data, killed)
    monkeypatch.setattr(pretrain_dit.checkpoint, "save", real_save)
    assert steps == [3] and not (killed / pretrain_dit.DIT_FILE).exists()
    run(data, killed)
    a = load_file(str(whole / "hf" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(killed / "hf" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(load_file(str(whole / "text_embed.safetensors"))["text_embed"],
                       load_file(str(killed / "text_embed.safetensors"))["text_embed"])
    ref = json.loads((whole / pretrain_dit.DIT_FILE).read_text())
    assert ref["path"] == "hf" and ref["steps"] == 6


def test_the_pretrained_dit_loads_into_the_vision_tower(data, tmp_path, tiny_xfusion):
    run(data, tmp_path / "dit")
    dit = SD3Transformer2DModel.from_pretrained(tmp_path / "dit" / "hf")
    model = tiny_xfusion("x_fuse_dit", {"model.dit.tiny": SMALL["model.dit.tiny"]})
    assert load_dit_json_(model, tmp_path / "dit" / pretrain_dit.DIT_FILE) == 3
    top = model.blocks[-1].vision[-1]
    assert torch.equal(top.ff[2].weight, dit.transformer_blocks[-1].ff.net[2].weight)


def test_figure7_sets_the_dit_beside_both_x_fusion_runs(data, tmp_path):
    """eval.figure7 on the sample rules' files of two runs and a pretrained tiny DiT."""
    from PIL import Image

    from eval import figure7

    run(data, tmp_path / "dit")
    samples = {}
    for label in ("X-Fusion (Pretrained DiT)", "X-Fusion"):
        d = tmp_path / label.replace(" ", "_")
        (d / "t2i").mkdir(parents=True)
        entries = []
        for i, caption in enumerate(CAPTIONS[:2]):
            Image.new("RGB", (32, 32), (40 * i, 80, 120)).save(d / "t2i" / f"{i}.png")
            Image.new("RGB", (32, 32), (9, 9, 9)).save(d / f"eval{i}.png")
            entries.append({"index": i, "id": f"i{i}", "prompt": caption, "file": f"{i}.png"})
        atomic_write_jsonl(d / "t2i" / "index.jsonl", entries)
        atomic_write_jsonl(d / "i2t.jsonl", [{"id": f"i{i}", "image": str(d / f"eval{i}.png"),
                                              "caption": f"{label} says {i}"} for i in range(2)])
        samples[label] = d
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(apply_overrides(load_yaml(REPO / "config" / "tiny.yaml"),
                                                     {**SMALL, "evaluation.sample_steps": 2}),
                                     sort_keys=False))
    out = [tmp_path / "figure7.png", tmp_path / "figure7.pdf"]
    cells = {}
    real_panel = figure7.panel

    def spy(prompts, columns, images, captions):
        cells.update(columns=columns, captions=captions)
        return real_panel(prompts, columns, images, captions)

    figure7.panel = spy
    try:
        figure7.main(["--config", str(config), "--run", "x_fuse_dit", "--dit",
                      str(tmp_path / "dit"), "--tokenizer", str(data["root"] / "tokenizer"),
                      "--samples", *(f"{k}={v}" for k, v in samples.items()),
                      "--out", *map(str, out)])
    finally:
        figure7.panel = real_panel
    assert list(cells["columns"]) == [figure7.DIT_LABEL, *samples]
    assert all(len(v) == 2 for v in cells["columns"].values())
    assert cells["captions"]["X-Fusion"] == ["X-Fusion says 0", "X-Fusion says 1"]
    assert out[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out[1].stat().st_size > 0
