"""eval.linear_probe: BatchNorm(affine=False) + linear head, and features from the model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from eval.linear_probe import encode_labels, linear_probe


def blobs(n: int, d: int, classes: int, seed: int, spread: float = 0.3):
    """Gaussian blobs around well separated centres: linearly separable."""
    g = torch.Generator().manual_seed(seed)
    centres = 5 * torch.randn(classes, d, generator=torch.Generator().manual_seed(123))
    y = torch.randint(classes, (n,), generator=g)
    return centres[y] + spread * torch.randn(n, d, generator=g), y


def test_linearly_separable_features_are_classified_perfectly():
    x, y = blobs(400, 16, 5, seed=0)
    xt, yt = blobs(200, 16, 5, seed=1)
    acc = linear_probe(x, y, xt, yt, lr=6.4e-3, epochs=30, batch_size=64)
    assert acc >= 0.99


def test_random_labels_give_chance_accuracy():
    g = torch.Generator().manual_seed(0)
    x, xt = torch.randn(400, 16, generator=g), torch.randn(1000, 16, generator=g)
    y, yt = torch.randint(5, (400,), generator=g), torch.randint(5, (1000,), generator=g)
    acc = linear_probe(x, y, xt, yt, lr=6.4e-3, epochs=30, batch_size=64)
    assert acc == pytest.approx(0.2, abs=0.06)


def test_probe_is_invariant_to_feature_scale_thanks_to_batchnorm():
    x, y = blobs(300, 8, 3, seed=0, spread=2.0)
    xt, yt = blobs(300, 8, 3, seed=1, spread=2.0)
    a = linear_probe(x, y, xt, yt, lr=6.4e-3, epochs=10, batch_size=64)
    b = linear_probe(1000 * x + 7, y, 1000 * xt + 7, yt, lr=6.4e-3, epochs=10, batch_size=64)
    assert a == pytest.approx(b, abs=0.02)


def test_labels_map_to_train_classes_and_unseen_classes_stop():
    train = [{"shape": s} for s in ("circle", "square", "circle")]
    y, yt, k = encode_labels(train, [{"shape": "square"}], "shape")
    assert y.tolist() == [0, 1, 0] and yt.tolist() == [1] and k == 2
    with pytest.raises(SystemExit, match="cross"):
        encode_labels(train, [{"shape": "cross"}], "shape")


def test_probe_features_pool_image_tokens_per_layer_in_both_modes(tiny_xfusion):
    from eval.linear_probe import probe_features
    model = tiny_xfusion("dual_tower").eval()
    latents = torch.randn(5, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    prompts = [[1, 5, 6, 7], [1, 8], [1, 9, 10], [1, 11], [1, 12, 13, 14]]
    feats = {mode: probe_features(model, latents, prompts, mode, (1, 2), t=0.02, batch_size=2)
             for mode in ("understanding", "generation")}
    for mode in feats:
        assert set(feats[mode]) == {1, 2}
        assert all(f.shape == (5, 32) and torch.isfinite(f).all() for f in feats[mode].values())
    # generation mode reads a prompt and a noised image: other features than clean I2T
    assert not torch.allclose(feats["understanding"][2], feats["generation"][2])
    # the noise is seeded: a second extraction gives the same features
    again = probe_features(model, latents, prompts, "generation", (1, 2), t=0.02, batch_size=2)
    assert torch.equal(again[2], feats["generation"][2])


def test_probe_prompts_are_the_caption_tokens_training_sees(tmp_path):
    """Generation mode reads the prompt the model was trained on: the same ids as the training
    stream's, truncated to the same budget (captions here run past it)."""
    from eval.linear_probe import split_inputs
    from xfusion.config import apply_overrides, load_yaml, run_from_dict
    from xfusion.data.mixing import MixedStream
    from xfusion.io import atomic_write_jsonl
    from xfusion.latents import save_latents
    from xfusion.tokenizer import train_bpe

    captions = ["a large red circle on the left and a small blue square at the top.",
                "a small green triangle.",
                "a large yellow diamond in the centre beside a small purple cross on the right."]
    ids = [f"img{i}" for i in range(len(captions))]
    tok = train_bpe(captions * 4, vocab_size=300)
    root = Path(__file__).resolve().parents[1]
    cfg = run_from_dict(apply_overrides(load_yaml(root / "config" / "tiny.yaml"),
                                        {"data.max_caption_tokens": 6}))
    latents = torch.randn(len(ids), 4, 8, 8, generator=torch.Generator().manual_seed(0))
    save_latents(tmp_path / "latents.safetensors", latents, ids, {})
    atomic_write_jsonl(tmp_path / "scenes.jsonl",
                       [{"id": i, "labels": {"shape": "circle"}} for i in ids])
    atomic_write_jsonl(tmp_path / "captions.jsonl",
                       [{"id": i, "caption": c} for i, c in zip(ids, captions)])
    _, prompts, _ = split_inputs(tmp_path / "scenes.jsonl", tmp_path / "latents.safetensors",
                                 tmp_path / "captions.jsonl", tok, cfg.data.max_caption_tokens)
    stream = MixedStream(latents, captions, tok, cfg)
    assert prompts == stream.caption_ids
    assert max(map(len, prompts)) == cfg.data.max_caption_tokens  # the budget was reached
