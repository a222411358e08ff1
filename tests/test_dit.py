"""x_fuse_dit (X-Fusion Sec. 7.2): a vision tower of another width and depth, from an MMDiT.

The shape used here is asymmetric on both counts: the test Llama has 2 layers of width 32, the
vision tower 3 blocks of width 16 (2 heads x 8)."""

from __future__ import annotations

import pytest
import torch

from xfusion.model.base import text_weight_hash
from xfusion.model.dit import VisionBlock, layer_map, load_mmdit_, orthonormal

SHAPE = {"num_layers": 3, "num_attention_heads": 2, "attention_head_dim": 8,
         "joint_attention_dim": 12, "pooled_projection_dim": 10}
ASYMMETRIC = {"model.dit.tiny": SHAPE}


def dit_model(tiny_xfusion, overrides=None):
    return tiny_xfusion("x_fuse_dit", {**ASYMMETRIC, **(overrides or {})})


@pytest.mark.parametrize("n_text,n_vision,expected", [
    (4, 2, [[], [0], [], [1]]),  # one vision block per 2 text layers, the last at the top
    (2, 3, [[0], [1, 2]]),  # deeper than the LLM: a layer runs two in a row
    (3, 3, [[0], [1], [2]]),
    (4, 3, [[], [0], [1], [2]]),
])
def test_layer_map_spreads_blocks_evenly_and_ends_at_the_last_layer(n_text, n_vision, expected):
    hosts = layer_map(n_text, n_vision)
    assert hosts == expected
    assert sorted(j for h in hosts for j in h) == list(range(n_vision))


@pytest.mark.parametrize("d_text,d_vision", [(32, 16), (16, 32)])
def test_width_projections_start_orthonormal_so_the_narrow_side_round_trips(d_text, d_vision):
    q = orthonormal(d_text, d_vision)  # (d_text, d_vision)
    assert q.shape == (d_text, d_vision)
    small = min(d_text, d_vision)
    gram = q.T @ q if d_text >= d_vision else q @ q.T
    assert torch.allclose(gram, torch.eye(small), atol=1e-5)


def test_the_tower_has_the_dit_shape_not_the_text_layers(tiny_xfusion):
    model = dit_model(tiny_xfusion)
    assert [len(b.vision) for b in model.blocks] == [1, 2]
    block = model.blocks[1]
    assert block.down.weight.shape == (16, 32) and block.up.weight.shape == (32, 16)
    assert block.vision[0].to_q.weight.shape == (16, 16)


def test_text_only_input_gives_the_base_logits_bitwise_at_init_and_after_training(
        tiny_xfusion, mixed_samples):
    model = dit_model(tiny_xfusion)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, 64, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    opt = torch.optim.AdamW(model.param_groups(1e-2))
    for step in range(3):  # at init, then after each of two optimizer steps on mixed batches
        with torch.no_grad():
            assert torch.equal(model.text_logits(ids), model.llm(ids).logits)
            ours = model.text_logits(ids, attention_mask=mask)
            assert torch.equal(ours[mask.bool()],
                               model.llm(ids, attention_mask=mask).logits[mask.bool()])
        batch = model.build_batch(mixed_samples(step), torch.Generator().manual_seed(step))
        model.compute_loss(batch).loss.backward()
        opt.step()
        opt.zero_grad()
    assert model.blocks[1].beta.detach().item() != 0.0  # the X-Fuse mixing did train
    assert text_weight_hash(model.llm) == model.base_ref["text_weight_hash"]


def test_caption_loss_alone_reaches_the_vision_tower(tiny_xfusion, mixed_samples):
    model = dit_model(tiny_xfusion, {"training.i2t_denoise_loss": False})
    i2t = [s for s in mixed_samples(0) if s.task == "i2t"]
    out = model.compute_loss(model.build_batch(i2t))
    assert out.dm_loss == 0 and out.ar_loss > 0
    out.loss.backward()
    # Layer 0's vision block, its projections and the DiT time embedding: the image tokens it
    # writes are read by layer 1's text queries (the top layer's feed the velocity head only).
    reached = [n for n, p in model.named_parameters()
               if n.startswith(("blocks.0.vision.", "blocks.0.down", "blocks.0.up",
                                "blocks.0.text_kv", "vision_time."))]
    assert len(reached) > 10
    for name, p in model.named_parameters():
        if name in reached:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in model.llm.parameters())


def test_image_tokens_need_their_timesteps(tiny_xfusion, mixed_samples):
    model = dit_model(tiny_xfusion)
    batch = model.build_batch(mixed_samples(0))
    embeds = model.embed(batch.input_ids, batch.image_mask,
                         model.image_io.encode(batch.noisy_latents, batch.t))
    with pytest.raises(ValueError, match="timesteps"):
        model.forward_chunk(embeds, batch.image_mask, batch.span_ids, batch.valid)


def tiny_sd3(shape=SHAPE, seed=0):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    width = shape["num_attention_heads"] * shape["attention_head_dim"]
    return SD3Transformer2DModel(
        sample_size=4, patch_size=2, in_channels=4, out_channels=4, pos_embed_max_size=4,
        caption_projection_dim=width, **shape)


def test_a_saved_sd3_transformer_loads_into_the_vision_tower(tiny_xfusion, tmp_path):
    """The real loading code on a real diffusers class: a random SD3Transformer2DModel saved
    with save_pretrained, loaded offline from the directory."""
    dit = tiny_sd3()
    dit.save_pretrained(tmp_path / "dit")
    model = dit_model(tiny_xfusion, {"model.dit.source": "pretrained",
                                     "model.dit.path": str(tmp_path / "dit")})
    assert load_mmdit_(model, str(tmp_path / "dit")) == 3
    ours = [v for b in model.blocks for v in b.vision]
    for mine, theirs in zip(ours, dit.transformer_blocks):
        for name, source in VisionBlock.SOURCE.items():
            for kind in ("weight", "bias"):
                assert torch.equal(mine.get_submodule(name).get_parameter(kind),
                                   theirs.get_submodule(source).get_parameter(kind)), name
    t = torch.tensor([0.3, 0.8])
    pooled = torch.zeros(2, SHAPE["pooled_projection_dim"])
    assert torch.allclose(model.vision_time(t), dit.time_text_embed(t * 1000, pooled))


def test_a_vision_block_computes_the_mmdit_image_stream(tiny_xfusion):
    """Our block's math is the JointTransformerBlock's on image tokens (no text in the joint
    attention, so the context stream's modulated norm plays no part)."""
    dit = tiny_sd3().eval()
    theirs = dit.transformer_blocks[0]
    mine = VisionBlock(dit_model(tiny_xfusion).cfg.model.dit.tiny)
    mine.load_from(theirs)
    g = torch.Generator().manual_seed(1)
    x, temb = torch.randn(2, 5, 16, generator=g), torch.randn(2, 16, generator=g)
    with torch.no_grad():
        _, expected = theirs(x, torch.zeros(2, 0, 16), temb)  # (B, 5, 16)
        mod = [m.repeat_interleave(5, dim=0) for m in mine.modulation(temb)]  # (10, 16) each
        flat = x.reshape(10, 16)
        q, k, v = (a.view(2, 5, 2, 8).transpose(1, 2) for a in mine.image_kv(flat, mod))
        attn = torch.nn.functional.scaled_dot_product_attention(q, k, v)  # (B, H, 5, hd)
        out = mine.finish(flat, attn.transpose(1, 2).reshape(10, 16), mod)
    assert torch.allclose(out.view(2, 5, 16), expected, atol=1e-5)
