"""Sampling: the prompt KV cache and the caption KV cache change nothing; T2I output resumes."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from bad_files import assert_stops_naming, jsonl_with, report_items
from xfusion import sample
from xfusion.config import ARCHITECTURES

PIXEL_LATENTS = {"model.codec.latent_channels": 3, "model.codec.downsample": 1,
                 "data.image_size": 4}  # 3x4x4 latents that the pixel_shuffle codec decodes


def trained_like(model):
    """Move every trainable parameter off its init (zero unpatchify, gamma = beta = 0, towers
    equal to the text layer), so the cache is tested on towers that differ."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_t2i_with_prompt_kv_cache_equals_recomputing_the_sequence(arch, tiny_xfusion):
    model = trained_like(tiny_xfusion(arch, PIXEL_LATENTS))
    noise = torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    cached = sample.generate_images(model, PROMPTS, steps=4, cfg_scale=3.0, noise=noise)
    full = sample.generate_images(model, PROMPTS, steps=4, cfg_scale=3.0, noise=noise,
                                  kv_cache=False)
    assert cached.shape == (3, 3, 4, 4)
    assert torch.allclose(cached, full, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(cached, noise)  # the model did move the latents


def test_t2i_prompt_in_a_batch_equals_the_prompt_alone(tiny_xfusion):
    model = trained_like(tiny_xfusion("dual_tower", PIXEL_LATENTS))
    noise = torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    batch = sample.generate_images(model, PROMPTS, steps=3, cfg_scale=2.0, noise=noise)
    alone = sample.generate_images(model, PROMPTS[1:2], steps=3, cfg_scale=2.0, noise=noise[1:2])
    assert torch.allclose(batch[1:2], alone, atol=1e-5)  # left padding changes nothing


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_cached_greedy_captioning_equals_uncached(arch, tiny_xfusion):
    model = trained_like(tiny_xfusion(arch, PIXEL_LATENTS))
    latents = torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    cached = sample.generate_captions(model, latents, max_new_tokens=12)
    full = sample.generate_captions(model, latents, max_new_tokens=12, kv_cache=False)
    assert cached == full and all(len(c) > 0 for c in cached)
    nucleus = [sample.generate_captions(model, latents, 12, top_p=0.9, kv_cache=kv,
                                        generator=torch.Generator().manual_seed(0))
               for kv in (True, False)]
    assert nucleus[0] == nucleus[1]


def test_nucleus_keeps_only_the_top_mass():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.05, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {sample.choose_token(logits, 0.8, g).item() for _ in range(200)}
    assert draws == {0, 1}
    assert sample.choose_token(logits, None).item() == 0


class StubTokenizer:
    """Characters -> ids in [5, 60), bos = 1; called on a batch of texts as encode_captions
    calls a transformers tokenizer."""

    def __call__(self, texts: list[str], add_special_tokens: bool = True):
        bos = [1] if add_special_tokens else []
        return {"input_ids": [bos + [5 + ord(c) % 55 for c in t] for t in texts]}


def test_t2i_resume_skips_existing_images_and_regenerates_the_same(tiny_xfusion, tmp_path,
                                                                  monkeypatch):
    model = trained_like(tiny_xfusion("dual_tower", PIXEL_LATENTS))
    model.tokenizer = StubTokenizer()
    prompts = tmp_path / "captions.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"im{i}", "image": f"im{i}.png",
                                           "caption": f"a red square {i}"}) + "\n"
                               for i in range(4)))
    ev = dataclasses.replace(model.cfg.evaluation, n_samples=3, sample_batch_size=2,
                             sample_steps=2)
    out = tmp_path / "t2i"
    sample.sample_t2i(model, ev, prompts, out, seed=0)
    rows = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert [r["file"] for r in rows] == ["0.png", "1.png", "2.png"]
    assert rows[1] == {"index": 1, "id": "im1", "prompt": "a red square 1", "file": "1.png"}
    first = (out / "1.png").read_bytes()
    (out / "1.png").unlink()
    calls = []
    real = sample.generate_images
    monkeypatch.setattr(sample, "generate_images",
                        lambda m, p, *a, **k: calls.append(len(p)) or real(m, p, *a, **k))
    sample.sample_t2i(model, ev, prompts, out, seed=0)
    assert calls == [1]  # only the missing image
    assert (out / "1.png").read_bytes() == first


def test_cli_samples_images_and_captions_from_a_saved_model_dir(tmp_path):
    """The user's path: a base LLM dir + tokenizer + base_model.json, a saved model dir, then
    `python -m xfusion.sample` in both modes."""
    from xfusion.config import TinyLlamaConfig, apply_overrides, load_yaml, run_from_dict
    from xfusion.latents import save_latents
    from xfusion.model import XFusionModel
    from xfusion.model.base import build_tiny_llama, load_base_llm, text_weight_hash
    from xfusion.tokenizer import train_bpe

    tok = train_bpe(["a red square", "two blue circles", "a green triangle"] * 20, 300)
    llm = build_tiny_llama(TinyLlamaConfig(hidden_size=32, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2,
                                           intermediate_size=64), len(tok), tok.bos_token_id,
                           tok.eos_token_id, tok.pad_token_id)
    base = tmp_path / "base_lm"
    llm.save_pretrained(base / "hf")
    tok.save_pretrained(base / "hf")
    (base / "base_model.json").write_text(json.dumps(
        {"path": "hf", "tokenizer": "hf", "text_weight_hash": text_weight_hash(llm)}))
    raw = apply_overrides(load_yaml("config/tiny.yaml"), {
        **PIXEL_LATENTS, "evaluation.n_samples": 2, "evaluation.sample_steps": 2,
        "evaluation.caption_max_tokens": 3})
    model = XFusionModel.from_base(run_from_dict(raw), *load_base_llm(base / "base_model.json"))
    model.save(tmp_path / "model")
    captions = tmp_path / "captions.jsonl"
    captions.write_text("".join(json.dumps({"id": f"im{i}", "image": f"/x/im{i}.png",
                                           "caption": "a red square"}) + "\n" for i in range(3)))
    sample.main(["--model", str(tmp_path / "model"), "--mode", "t2i", "--prompts", str(captions),
                 "--out", str(tmp_path / "t2i"), "--device", "cpu"])
    assert sorted(p.name for p in (tmp_path / "t2i").iterdir()) == ["0.png", "1.png", "index.jsonl"]
    # The grid a person looks at lies beside the samples (FID reads every PNG inside t2i/).
    from PIL import Image

    grid = Image.open(tmp_path / "t2i_grid.png")
    assert grid.size == (4 * 96, 96)  # two samples: one row of a 4-column grid
    second = Image.open(tmp_path / "t2i" / "1.png").convert("RGB").resize((96, 96),
                                                                            Image.NEAREST)
    assert grid.crop((96, 0, 192, 96)).tobytes() == second.tobytes()
    save_latents(tmp_path / "lat.safetensors", torch.randn(3, 3, 4, 4), ["im0", "im1", "im2"], {})
    sample.main(["--model", str(tmp_path / "model"), "--mode", "i2t", "--latents",
                 str(tmp_path / "lat.safetensors"), "--captions", str(captions), "--out",
                 str(tmp_path / "i2t.jsonl"), "--device", "cpu"])
    rows = [json.loads(line) for line in (tmp_path / "i2t.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["im0", "im1"]
    assert rows[0]["reference"] == "a red square" and isinstance(rows[0]["caption"], str)


@pytest.mark.parametrize("kind", ["empty caption", "undecodable line"])
def test_t2i_prompts_that_are_bad_inputs_are_skipped_and_named_or_stop(tiny_xfusion, tmp_path,
                                                                       kind):
    model = trained_like(tiny_xfusion("dual_tower", PIXEL_LATENTS))
    model.tokenizer = StubTokenizer()
    prompts = tmp_path / "captions.jsonl"
    rows = [{"id": f"im{i}", "image": f"im{i}.png", "caption": f"a red square {i}"}
            for i in range(3)]
    record = {"id": "bad", "image": "bad.png",
              "caption": " " if kind == "empty caption" else "CAFE"}
    prompts.write_bytes(jsonl_with(rows, record, kind))
    ev = dataclasses.replace(model.cfg.evaluation, n_samples=3, sample_batch_size=2,
                             sample_steps=2)
    out = tmp_path / "t2i"
    sample.sample_t2i(model, ev, prompts, out, seed=0, policy="skip")
    index = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert [(r["index"], r["id"], r["file"]) for r in index] == [
        (0, "im0", "0.png"), (1, "im1", "1.png"), (2, "im2", "2.png")]
    assert report_items(tmp_path / "t2i.bad_inputs.json") == {("captions.jsonl", 3, kind)}
    assert_stops_naming(lambda: sample.sample_t2i(model, ev, prompts, tmp_path / "stop", seed=0,
                                                  policy="stop"), f"{prompts}:3")
    assert not (tmp_path / "stop" / "index.jsonl").exists()
