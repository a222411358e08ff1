"""The DeepSpeed engine on CPU (gloo, ZeRO-2): schedule, clipping, frozen params, accumulation,
exact resume from DeepSpeed's own checkpoint loaded weights_only."""

import io

import pytest
import torch

from xfusion.config import TrainingConfig
from xfusion.engine import DS_BUCKET_ELEMENTS, Engine, bucket_elements, deepspeed_config
from xfusion.engine import lr_factor

TRAINING = TrainingConfig(steps=10, lr=1e-2, warmup_steps=4, grad_clip=1.0, zero_stage=2)


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    model[0].requires_grad_(False)  # a frozen "text tower"
    return model


def _engine(model: torch.nn.Module, training: TrainingConfig = TRAINING) -> Engine:
    groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": training.lr}]
    return Engine(model, groups, training, micro_batch_size=8)


def _train(engine: Engine, steps: range) -> list[float]:
    losses = []
    for step in steps:
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g)
        loss = (engine.module(x) - y).pow(2).mean()
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def test_lr_factor_warms_up_linearly_then_constant_or_cosine():
    assert [lr_factor(s, 4, 10) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_factor(4, 4, 10, "cosine") == 1.0
    assert lr_factor(10, 4, 10, "cosine") == pytest.approx(0.0)
    assert lr_factor(7, 0, 10, "none") == 1.0


def test_deepspeed_config_follows_training_config():
    cfg = deepspeed_config(TrainingConfig(grad_clip=0.5, zero_stage=2, precision="bf16"), 3)
    assert cfg["train_micro_batch_size_per_gpu"] == 3
    assert cfg["gradient_accumulation_steps"] == 1 and cfg["train_batch_size"] == 3
    big = deepspeed_config(TrainingConfig(), 3, gradient_accumulation_steps=4, world=2)
    assert (big["gradient_accumulation_steps"], big["train_batch_size"]) == (4, 24)
    assert cfg["gradient_clipping"] == 0.5
    assert cfg["zero_optimization"]["stage"] == 2
    assert cfg["bf16"] == {"enabled": True}
    assert "bf16" not in deepspeed_config(TrainingConfig(precision="fp32"), 1)


def test_zero_buckets_hold_the_trainable_gradients_and_never_exceed_deepspeeds_default():
    zero = deepspeed_config(TrainingConfig(), 3, trainable_numel=1234)["zero_optimization"]
    assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == 1536  # 3 x 512
    assert bucket_elements(10**10) == DS_BUCKET_ELEMENTS  # an 8B vision tower: the default
    assert bucket_elements(None) == DS_BUCKET_ELEMENTS


@pytest.mark.parametrize("pinned", [False, True])
def test_sized_buckets_train_bitwise_like_deepspeeds_default_buckets(monkeypatch, pinned):
    """One bucket of all trainable gradients (ours) or of 5e8 elements (DeepSpeed's default)
    reduces the same gradients in the same call: the same weights, bit for bit, also under the
    pretraining's pinned numerics (deterministic algorithms fill each new bucket with NaN)."""
    import contextlib

    from xfusion.pretrain_lm import pin_numerics

    with pin_numerics() if pinned else contextlib.nullcontext():
        sized = _engine(_model())
        _train(sized, range(4))
        monkeypatch.setattr("xfusion.engine.bucket_elements", lambda numel: DS_BUCKET_ELEMENTS)
        default = _engine(_model())
        _train(default, range(4))
    for a, b in zip(sized.module.parameters(), default.module.parameters()):
        assert torch.equal(a, b)


def test_engine_trains_only_trainable_params_with_warmup_lr():
    model = _model()
    frozen = model[0].weight.detach().clone()
    engine = _engine(model)
    before = model[2].weight.detach().clone()
    _train(engine, range(1))
    assert engine.lr == pytest.approx(TRAINING.lr * 2 / 4)  # after 1 step: factor (1 + 1) / 4
    assert engine.grad_norm > 0
    assert torch.equal(model[0].weight, frozen)
    assert not torch.equal(model[2].weight, before)


def test_resume_from_deepspeed_checkpoint_is_bitwise_equal_to_uninterrupted(tmp_path):
    full = _model()
    _train(_engine(full), range(6))

    first = _model()
    engine = _engine(first)
    _train(engine, range(3))
    engine.save(tmp_path)
    files = sorted(p.name for p in (tmp_path / "deepspeed").iterdir())
    assert files == ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    module = torch.load(tmp_path / "deepspeed" / files[0], weights_only=True)["module"]
    assert set(module) == {"2.weight", "2.bias"}  # exclude_frozen_parameters: no frozen layer

    resumed = _model(seed=1)  # different init: every trained value must come from the checkpoint
    frozen = resumed[0].weight.detach().clone()
    engine = _engine(resumed)
    engine.load(tmp_path)
    assert engine.global_step == 3
    assert torch.equal(resumed[0].weight, frozen)  # frozen weights are never loaded
    with torch.no_grad():  # the frozen layer is the base model's: give it the same one
        resumed[0].weight.copy_(full[0].weight), resumed[0].bias.copy_(full[0].bias)
    _train(engine, range(3, 6))
    for (name, a), b in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


def test_deepspeed_checkpoint_load_refuses_unlisted_pickled_classes(tmp_path):
    engine = _engine(_model())
    _train(engine, range(1))
    engine.save(tmp_path)
    optim = tmp_path / "deepspeed" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    state = torch.load(optim, weights_only=False)
    state["payload"] = io.StringIO("not a tensor")  # any class outside the allowlist
    torch.save(state, optim)
    with pytest.raises(Exception, match="Weights only load failed"):
        engine.load(tmp_path)


def test_gradient_accumulation_equals_one_big_batch_of_equal_micro_batches():
    # loss = mean over samples: 2 micro-batches of 4 accumulated (DeepSpeed divides each by 2)
    # is the mean over all 8, so the weights match one batch of 8 up to summation order.
    big, accumulated = _model(), _model()
    e1 = _engine(big)
    groups = [{"params": [p for p in accumulated.parameters() if p.requires_grad],
               "lr": TRAINING.lr}]
    e2 = Engine(accumulated, groups, TRAINING, micro_batch_size=4, gradient_accumulation_steps=2)
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g)
        e1.backward((e1.module(x) - y).pow(2).mean())
        e1.step()
        for half in (slice(0, 4), slice(4, 8)):
            assert e2.at_boundary == (half.start == 4)
            e2.backward((e2.module(x[half]) - y[half]).pow(2).mean())
            e2.step()
        assert e2.global_step == step + 1
    for (name, a), b in zip(big.named_parameters(), accumulated.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def test_engine_rejects_groups_without_trainable_params():
    model = _model()
    with pytest.raises(ValueError, match="no trainable parameter"):
        Engine(model, [{"params": list(model[0].parameters())}], TRAINING, micro_batch_size=1)


@pytest.mark.parametrize("architecture", ["single_tower", "gated_tower", "dual_projection",
                                          "dual_tower", "x_fuse"])
def test_every_variant_takes_a_zero2_step_and_moves_its_trainable_weights(
        architecture, tiny_xfusion, mixed_samples):
    # DeepSpeed broadcasts and flattens every trainable parameter: shapes a plain optimizer
    # accepts (a 0-dim gate, say) can still fail there, so each variant goes through it once.
    model = tiny_xfusion(architecture)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    engine = Engine(model, model.param_groups(1e-2), TRAINING, micro_batch_size=4)
    engine.backward(model.compute_loss(model.build_batch(mixed_samples())).loss)
    engine.step()
    moved = [n for n, p in model.named_parameters() if p.requires_grad
             and not torch.equal(p.detach(), before[n])]
    assert moved, f"{architecture}: no trainable weight changed after a ZeRO-2 step"


def test_activation_checkpointing_gives_the_same_gradients(tiny_xfusion, mixed_samples):
    grads = []
    for recompute in (False, True):
        model = tiny_xfusion("dual_tower", {"training.activation_checkpointing": recompute})
        batch = model.build_batch(mixed_samples(), torch.Generator().manual_seed(0))
        model.compute_loss(batch).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    assert any(n.startswith("blocks.") and g.abs().sum() > 0 for n, g in grads[1].items())
    for name in grads[0]:  # the vision tower gets its gradient through the frozen text layers
        assert torch.equal(grads[0][name], grads[1][name]), name


def test_bf16_runs_on_the_cpu_accelerator_with_fp32_master_weights(tiny_xfusion, mixed_samples):
    model = tiny_xfusion("dual_tower")
    bf16 = TrainingConfig(steps=4, lr=1e-2, warmup_steps=1, precision="bf16")
    engine = Engine(model, model.param_groups(1e-2), bf16, micro_batch_size=4)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())  # DeepSpeed casts it all
    losses = []
    for _ in range(3):
        loss = model.compute_loss(model.build_batch(mixed_samples())).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and engine.global_step == 3
