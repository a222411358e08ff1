"""XFusionModel: batch layout, losses, parameter groups, REPA, image hidden states, save/load."""

from __future__ import annotations

import json

import pytest
import torch

from xfusion.config import ARCHITECTURES, ConfigError, train_recipe
from xfusion.model.sequence import IGNORE, SpecialIds, build_batch
from xfusion.model.xfusion import CheckpointError, XFusionModel

IDS = SpecialIds(bos=1, eos=2, pad=0, boi=3, eoi=4)


def test_batch_layouts_follow_t2i_and_i2t_and_targets_are_i2t_captions_only(mixed_samples):
    b = build_batch(mixed_samples(0), IDS, patch_size=2)
    P = 4  # 4x4 latents, 2x2 patches
    assert b.input_ids[0, :6].tolist() == [1, 5, 6, 7, 8, 3] and b.input_ids[0, 6 + P] == 4
    assert b.input_ids[1, :2].tolist() == [1, 3]
    assert b.input_ids[1, 2 + P:2 + P + 5].tolist() == [4, 9, 10, 11, 2]
    assert b.input_ids[2, :2].tolist() == [1, 3]  # dropped caption: the CFG branch
    assert (b.image_mask.sum(1) == P).all() and torch.equal(b.span_ids, b.image_mask.long())
    assert (b.text_targets[[0, 2]] == IGNORE).all()
    assert b.text_targets[1, 2 + P:2 + P + 4].tolist() == [9, 10, 11, 2]
    assert (b.text_targets[1] != IGNORE).sum() == 4
    # T2I, clean I2T, T2I, noisy I2T: noisy I2T images are denoising examples by default
    assert b.dm_weight.tolist() == [1.0, 0.0, 1.0, 1.0]
    off = build_batch(mixed_samples(0), IDS, patch_size=2, i2t_denoise_loss=False)
    assert off.dm_weight.tolist() == [1.0, 0.0, 1.0, 0.0]
    assert not b.valid[1, -1] and b.valid[3].all()  # right padding


def test_noisy_latents_and_velocity_follow_rectified_flow(mixed_samples):
    samples = mixed_samples(0)
    b = build_batch(samples, IDS, 2, torch.Generator().manual_seed(0))
    x0 = torch.stack([s.latents for s in samples])
    eps = b.velocity_target + x0
    t = b.t.view(-1, 1, 1, 1)
    assert torch.allclose(b.noisy_latents, (1 - t) * x0 + t * eps, atol=1e-6)
    assert torch.equal(b.noisy_latents[1], x0[1])  # a clean I2T image (t = 0)


def test_sample_prediction_turns_the_clean_image_into_the_exact_velocity(tiny_xfusion,
                                                                          mixed_samples):
    """model.prediction: sample (JiT): an output layer that predicts x0 exactly gives the
    velocity target eps - x0 exactly, and the DM loss is then 0; v-prediction reads the same
    output as the velocity itself."""
    samples = [s for s in mixed_samples(0) if s.task == "t2i"]
    x_pred = tiny_xfusion("dual_tower", {"model.prediction": "sample"})
    b = x_pred.build_batch(samples, torch.Generator().manual_seed(0))
    assert (b.t >= 0.05).all()  # the clip of t is not exercised by this batch
    x0 = torch.stack([s.latents for s in samples])
    h = torch.randn(len(samples), 4, x_pred.llm.config.hidden_size)
    x_pred.image_io.decode = lambda hidden, height, width: x0  # a perfect x0 predictor
    v = x_pred.velocity(h, (4, 4), b.noisy_latents, b.t)
    assert torch.allclose(v, b.velocity_target, atol=1e-5)
    v_pred = tiny_xfusion("dual_tower", {"model.prediction": "velocity"})
    v_pred.image_io.decode = lambda hidden, height, width: x0
    assert torch.equal(v_pred.velocity(h, (4, 4), b.noisy_latents, b.t), x0)


def test_prediction_must_be_known(tiny_config):
    from xfusion.config import load_run

    with pytest.raises(ConfigError, match="model.prediction"):
        load_run(tiny_config({"model.prediction": "epsilon"}), "dual_tower")


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("task", ["t2i", "i2t"])
def test_a_one_task_batch_gives_every_trainable_parameter_a_gradient(tiny_xfusion, mixed_samples,
                                                                     architecture, task):
    """ZeRO reduces gradient buckets of a fixed size on every rank: a rank whose micro-batch
    holds one task only must still produce a gradient (zeros where unused) for every trainable
    parameter, or 2-rank single_tower training aborts in gloo."""
    model = tiny_xfusion(architecture)
    batch = model.build_batch([s for s in mixed_samples(0) if s.task == task],
                              torch.Generator().manual_seed(0))
    model.compute_loss(batch).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing[:5]


def test_switched_off_dm_loss_ignores_i2t_images_and_ar_loss_ignores_t2i_captions(
        tiny_xfusion, mixed_samples):
    model = tiny_xfusion("dual_tower", {"training.i2t_denoise_loss": False})
    s = mixed_samples(0)
    t2i = model.compute_loss(model.build_batch([s[0]]))
    i2t = model.compute_loss(model.build_batch([s[3]]))  # an I2T image noised with t = 0.2
    assert t2i.ar_loss == 0 and t2i.dm_loss > 0
    assert i2t.dm_loss == 0 and i2t.ar_loss > 0
    both = model.compute_loss(model.build_batch([s[0], s[3]], torch.Generator().manual_seed(0)))
    lam = model.cfg.training
    assert torch.allclose(both.loss, lam.lambda_ar * both.ar_loss + lam.lambda_dm * both.dm_loss)


@pytest.mark.parametrize("denoise", [True, False])
def test_dm_loss_counts_t2i_and_noisy_i2t_images_as_the_switch_says(tiny_xfusion, mixed_samples,
                                                                   denoise):
    """training.i2t_denoise_loss: the batch's DM loss is the mean of the per-image losses of
    T2I images, plus noisy I2T images when on; a clean I2T image never counts. The AR loss
    counts I2T captions either way."""
    model = tiny_xfusion("dual_tower", {"training.i2t_denoise_loss": denoise})
    s = mixed_samples(0)  # t2i (t 0.7), clean i2t (t 0), t2i (t 0.3, no caption), noisy i2t (0.2)
    noise = torch.randn(len(s), 4, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        alone = [model.compute_loss(model.build_batch([x], noise=noise[i:i + 1])).dm_loss
                 for i, x in enumerate(s)]
        both = model.compute_loss(model.build_batch(s, noise=noise))
    assert all(alone[i] > 0 for i in (0, 2)) and alone[1] == 0
    assert (alone[3] > 0) == denoise  # the noisy I2T image alone: a DM term only when on
    counted = [0, 2, 3] if denoise else [0, 2]
    assert torch.allclose(both.dm_loss, torch.stack([alone[i] for i in counted]).mean(),
                          rtol=1e-4)
    assert both.ar_loss > 0


def test_param_groups_scale_the_pretrained_weights_of_single_tower_only(tiny_xfusion):
    single = tiny_xfusion("single_tower", {"training.lr_text_ratio": 0.1})
    groups = {g["name"]: g for g in single.param_groups(1e-3)}
    assert groups["text"]["lr"] == pytest.approx(1e-4) and groups["image"]["lr"] == 1e-3
    n_llm = sum(1 for _ in single.llm.parameters())
    assert len(groups["text"]["params"]) == n_llm
    dual = tiny_xfusion("dual_tower")
    [group] = dual.param_groups(1e-3)
    trainable = {id(p) for p in dual.parameters() if p.requires_grad}
    assert {id(p) for p in group["params"]} == trainable
    assert not trainable & {id(p) for p in dual.llm.parameters()}


def test_repa_layer_beyond_the_depth_is_a_config_error(tiny_xfusion):
    with pytest.raises(ConfigError, match="model.repa.layer = 3"):
        tiny_xfusion("dual_tower", {"model.repa.enabled": True, "model.repa.layer": 3})


def test_repa_projector_is_supp_a_linear_w_by_default_and_the_mlp_on_request(tiny_xfusion):
    from torch import nn

    from xfusion.config import REPA_PROJECTORS
    from xfusion.model.repa import PROJECTORS

    assert tuple(PROJECTORS) == REPA_PROJECTORS
    repa = {"model.repa.enabled": True, "model.repa.layer": 1, "model.repa.feature_dim": 8}
    linear = tiny_xfusion("dual_tower", repa).repa.proj
    assert isinstance(linear, nn.Linear) and (linear.in_features, linear.out_features) == (32, 8)
    mlp = tiny_xfusion("dual_tower", {**repa, "model.repa.projector": "mlp"}).repa.proj
    layers = [m for m in mlp if isinstance(m, nn.Linear)]
    assert isinstance(mlp, nn.Sequential) and len(layers) == 3 and layers[-1].out_features == 8
    assert sum(isinstance(m, nn.SiLU) for m in mlp) == 2
    with pytest.raises(ConfigError, match="model.repa.projector"):
        tiny_xfusion("dual_tower", {**repa, "model.repa.projector": "conv"})


def test_repa_loss_is_one_minus_cosine_and_joins_the_total(tiny_xfusion, mixed_samples):
    model = tiny_xfusion("dual_tower", {"model.repa.enabled": True, "model.repa.layer": 1,
                                        "model.repa.feature_dim": 8})
    samples = mixed_samples(0)
    for s in samples:
        s.target_feats = torch.randn(4, 8)  # one feature per image token
    out = model.compute_loss(model.build_batch(samples, torch.Generator().manual_seed(0)))
    assert 0 < out.repa_loss < 2
    c = model.cfg
    expected = (c.training.lambda_ar * out.ar_loss + c.training.lambda_dm * out.dm_loss
                + c.model.repa.weight * out.repa_loss)
    assert torch.allclose(out.loss, expected)
    hs = model.image_hidden_states(model.build_batch(samples), [1])[1]
    z = model.repa.proj(hs)
    b = model.build_batch(samples)
    ref = (1 - torch.cosine_similarity(z, b.target_feats, dim=-1)).mean()
    assert torch.allclose(model.repa(hs, b.target_feats), ref)


def test_image_hidden_states_are_one_per_image_token_per_layer(tiny_xfusion, mixed_samples):
    model = tiny_xfusion("dual_tower")
    batch = model.build_batch(mixed_samples(0))
    out = model.image_hidden_states(batch, [1, 2])
    assert set(out) == {1, 2} and out[1].shape == (4, 4, 32)
    with pytest.raises(ValueError, match="layers 1..2"):
        model.image_hidden_states(batch, [3])


def trained(model, mixed_samples):
    opt = torch.optim.AdamW(model.param_groups(1e-2))
    model.compute_loss(model.build_batch(mixed_samples(0))).loss.backward()
    opt.step()
    return model


@pytest.mark.parametrize("arch", ["single_tower", "dual_tower"])
def test_save_then_load_restores_the_same_outputs(arch, tiny_xfusion, mixed_samples, tmp_path):
    model = trained(tiny_xfusion(arch), mixed_samples)
    model.save(tmp_path / "m")
    assert {p.name for p in (tmp_path / "m").iterdir()} == {
        "config.json", "recipe.json", "trainable.safetensors", "base_model.json"}
    recipe = json.loads((tmp_path / "m" / "recipe.json").read_text())
    assert recipe["recipe"] == train_recipe(model.cfg)
    ref = json.loads((tmp_path / "m" / "base_model.json").read_text())
    assert ref["text_weight_hash"] == model.base_ref["text_weight_hash"]
    fresh = tiny_xfusion(arch)  # the same base weights (same seed)
    loaded = XFusionModel.load(tmp_path / "m", base_llm=fresh.llm, tokenizer=IDS)
    batch = model.build_batch(mixed_samples(1), torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model._forward_batch(batch)[0], loaded._forward_batch(batch)[0])


def test_load_refuses_another_variant_and_another_base_model(tiny_xfusion, mixed_samples, tmp_path):
    tiny_xfusion("dual_tower").save(tmp_path / "m")
    with pytest.raises(CheckpointError, match="holds a dual_tower model, not x_fuse"):
        XFusionModel.load(tmp_path / "m", base_llm=tiny_xfusion("dual_tower").llm, tokenizer=IDS,
                          architecture="x_fuse")
    other_base = tiny_xfusion("dual_tower", seed=1).llm
    with pytest.raises(CheckpointError, match="was trained on base model"):
        XFusionModel.load(tmp_path / "m", base_llm=other_base, tokenizer=IDS)
