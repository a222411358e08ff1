"""eval.linear_probe: BatchNorm(affine=False) + linear head, and features from the model."""

from __future__ import annotations

import pytest
import torch

from eval.linear_probe import linear_probe, val_labels


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


def test_val_labels_map_to_train_classes_by_name_and_unseen_classes_stop():
    """A val folder may lack classes (so its indices shift): labels follow the class names."""
    from xfusion.probe_data import ProbeSet
    none = torch.zeros(0)
    train = ProbeSet(none, torch.tensor([0, 1, 2, 0]), ["circle", "cross", "square"], [])
    val = ProbeSet(none, torch.tensor([1, 0, 1]), ["circle", "square"], [])
    assert val_labels(train, val).tolist() == [2, 0, 2]
    with pytest.raises(SystemExit, match="diamond"):
        val_labels(train, ProbeSet(none, torch.tensor([0]), ["diamond"], []))


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
