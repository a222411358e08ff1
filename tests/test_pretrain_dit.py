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
    "model.codec.latent_channels": 4,
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
    save_latents(root / "latents.safetensors", torch.randn(8, 4, 8, 8, generator=g), ids, {})
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
