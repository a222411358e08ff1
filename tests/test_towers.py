"""Invariants of the block variants (X-Fusion Fig. 4): text preservation, equivalence at init,
gradient flow through frozen layers, per-sample independence of the routing, FLOPs."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from xfusion.config import ARCHITECTURES, VARIANTS
from xfusion.model.base import text_weight_hash
from xfusion.model.towers import BLOCKS

TEXT_PRESERVING = [a for a, v in VARIANTS.items() if v.preserves_text]


def text_batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, 64, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding, as MMLU batches
    return ids, mask


def train_a_few_steps(model, mixed_samples, steps: int = 3):
    opt = torch.optim.AdamW(model.param_groups(1e-2))
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        model.compute_loss(model.build_batch(mixed_samples(step), g)).loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("arch", TEXT_PRESERVING)
def test_text_logits_bitwise_equal_base_llama_at_init_and_after_training(arch, tiny_xfusion,
                                                                         mixed_samples):
    model = tiny_xfusion(arch)
    ids, mask = text_batch()
    for _ in range(2):  # at init, then after optimizer steps on mixed batches
        with torch.no_grad():
            assert torch.equal(model.text_logits(ids), model.llm(ids).logits)
            ours = model.text_logits(ids, attention_mask=mask)
            theirs = model.llm(ids, attention_mask=mask).logits
        assert torch.equal(ours[mask.bool()], theirs[mask.bool()])
        assert model.preserves_text
        train_a_few_steps(model, mixed_samples)
    assert text_weight_hash(model.llm) == model.base_ref["text_weight_hash"]


def test_gated_tower_gating_text_too_equals_the_base_only_at_init(tiny_xfusion, mixed_samples):
    model = tiny_xfusion("gated_tower", {"model.gate_text": True})
    ids, _ = text_batch()
    with torch.no_grad():
        assert torch.equal(model.text_logits(ids), model.llm(ids).logits)  # gamma = 0
    train_a_few_steps(model, mixed_samples)
    with torch.no_grad():
        assert not torch.equal(model.text_logits(ids), model.llm(ids).logits)
    assert not model.preserves_text


def test_registry_names_a_block_class_per_variant_in_the_papers_order():
    assert list(BLOCKS) == list(ARCHITECTURES) == list(VARIANTS)
    assert [BLOCKS[a].__name__ for a in ARCHITECTURES] == [v.block for v in VARIANTS.values()]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_registry_text_facts_hold_for_each_block(arch, tiny_xfusion, mixed_samples):
    """VARIANTS says whether the text weights train and whether text outputs stay the base
    LLM's; training a few steps shows both."""
    model = tiny_xfusion(arch)
    variant = VARIANTS[arch]
    assert any(p.requires_grad for p in model.llm.parameters()) == variant.trains_text
    assert model.preserves_text == variant.preserves_text
    ids, _ = text_batch()
    perturb_init(model)  # gamma, beta off zero: a block that can move text outputs does
    train_a_few_steps(model, mixed_samples)
    unchanged = text_weight_hash(model.llm) == model.base_ref["text_weight_hash"]
    assert unchanged == (not variant.trains_text)
    if unchanged:  # model.llm is still the base LLM: compare the text path with it
        with torch.no_grad():
            same = torch.equal(model.text_logits(ids), model.llm(ids).logits)
        assert same == variant.preserves_text


def hidden(model, batch):
    with torch.no_grad():
        return model._forward_batch(batch)[0]


# x_fuse_dit's vision tower is a DiT's, not a copy of the text layer (tests/test_dit.py).
@pytest.mark.parametrize("arch", [a for a in ARCHITECTURES
                                  if a != "single_tower" and not VARIANTS[a].dit])
def test_variants_equal_single_tower_at_init_on_mixed_sequences(arch, tiny_xfusion, mixed_samples):
    single, other = tiny_xfusion("single_tower"), tiny_xfusion(arch)
    batch = single.build_batch(mixed_samples(0), torch.Generator().manual_seed(0))
    a, b = hidden(single, batch), hidden(other, batch)
    valid = batch.valid
    assert torch.allclose(a[valid], b[valid], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_each_sample_in_a_padded_mixed_batch_equals_the_sample_alone(arch, tiny_xfusion,
                                                                      mixed_samples):
    model = tiny_xfusion(arch)
    with torch.no_grad():  # break the init symmetry, so the towers differ
        for name, p in model.named_parameters():
            if p.requires_grad and not name.startswith("llm."):
                p.add_(0.05 * torch.randn_like(p))
    samples = mixed_samples(1)
    batch = model.build_batch(samples, torch.Generator().manual_seed(0))
    full = hidden(model, batch)
    for i in range(len(samples)):
        alone = model.build_batch([samples[i]], torch.Generator().manual_seed(0))
        # same noisy latents as in the batch: copy them over
        alone.noisy_latents = batch.noisy_latents[i:i + 1]
        n = int(batch.valid[i].sum())
        assert torch.allclose(full[i, :n], hidden(model, alone)[0], atol=1e-5, rtol=1e-5)


def perturb_init(model):
    """Move the parameters whose init value blocks some gradient (zero unpatchify, gamma = 0,
    beta = 0) so that every trainable parameter must receive a non-zero gradient."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and (name.endswith(("gamma", "beta")) or "unpatch" in name):
                p.add_(0.1 + 0.1 * torch.randn_like(p))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_gradients_reach_every_trainable_parameter_and_no_frozen_one(arch, tiny_xfusion,
                                                                     mixed_samples):
    model = tiny_xfusion(arch)
    perturb_init(model)
    model.compute_loss(model.build_batch(mixed_samples(0))).loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    frozen = [p for p in model.llm.parameters() if not p.requires_grad]
    assert (len(frozen) == 0) == (arch == "single_tower")


@pytest.mark.parametrize("arch", ["dual_tower", "dual_projection", "x_fuse"])
def test_caption_loss_alone_trains_the_vision_tower_through_frozen_text_layers(arch, tiny_xfusion,
                                                                               mixed_samples):
    # the switch off: the noisy I2T image would otherwise add its denoising loss
    model = tiny_xfusion(arch, {"training.i2t_denoise_loss": False})
    i2t = [s for s in mixed_samples(0) if s.task == "i2t"]
    out = model.compute_loss(model.build_batch(i2t))
    assert out.dm_loss == 0 and out.ar_loss > 0
    out.loss.backward()
    # Every vision parameter below the last layer: the last layer's image outputs feed only the
    # velocity head (and, in dual_projection, its image K/V only reach image queries).
    vision = {n: p for n, p in model.named_parameters() if n.startswith("blocks.0.")}
    assert vision and all(p.grad is not None and p.grad.abs().sum() > 0 for p in vision.values())
    assert all(p.grad is None for p in model.llm.parameters())


def forward_flops(model, batch) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model._forward_batch(batch)
    return counter.get_total_flops()


def test_dual_tower_costs_about_one_tower_and_x_fuse_more(tiny_xfusion, mixed_samples):
    batch = None
    flops = {}
    for arch in ("single_tower", "dual_tower", "x_fuse"):
        model = tiny_xfusion(arch)
        batch = batch or model.build_batch(mixed_samples(0))
        flops[arch] = forward_flops(model, batch)
    # Dual tower pays only for the vision tower's keys/values of text tokens (and the reverse):
    # ~11% at this 32-wide toy shape with a 64-wide MLP, ~4% at Llama-3.2-1B (benchmarks/flops.py).
    # Computing both towers on every token (X-Fuse does it on purpose) would be ~2x.
    assert flops["dual_tower"] <= 1.15 * flops["single_tower"]
    assert flops["x_fuse"] >= 1.8 * flops["single_tower"]
