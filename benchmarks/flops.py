"""Forward FLOPs of the block variants relative to single_tower, on one mixed T2I + I2T batch.

The point of the dual tower (X-Fusion Sec. 5, "FLOPs") is that each tower asks queries only for
its own modality, so it costs about one tower; computing both towers on every token and then
selecting (`naive_dual_tower`, written here only as the reference) costs about twice.
x_fuse_dit (Sec. 7.2) is put against dual_tower too: its vision tower is a DiT's (DIT_SHAPES).
Counted with torch.utils.flop_counter.FlopCounterMode over the decoder stack (the embedding, image
I/O and heads are the same for every variant); the Llama-3.2-1B shape runs on the meta device.

`python -m benchmarks.flops` prints `ratio flops.<shape>.<variant>/single_tower <value>`.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, LlamaForCausalLM

from xfusion.config import apply_overrides, load_yaml, run_from_dict
from xfusion.model import Sample, SpecialIds, XFusionModel
from xfusion.model.mask import attention_mask, position_ids
from xfusion.model.sequence import build_batch
from xfusion.model.towers import IMG, TXT, DualTower, attend, finish, gather

IDS = SpecialIds(bos=1, eos=2, pad=0, boi=3, eoi=4)
VARIANTS = ("dual_tower", "naive_dual_tower", "dual_projection", "x_fuse", "x_fuse_dit")
# name: (Llama shape, latent (C, h, w), caption tokens)
SHAPES = {
    "tiny": (dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=344, vocab_size=2048), (48, 8, 8), 40),
    "llama-3.2-1b": (dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                          num_key_value_heads=8, intermediate_size=8192, vocab_size=128256),
                     (4, 32, 32), 77),
}
# x_fuse_dit's vision tower per shape (model.dit.tiny); None: config/tiny.yaml's (2 x 64 wide).
# Beside Llama-3.2-1B, SD3-medium's MMDiT: 24 blocks of 1536 (config/paper.yaml's model.dit).
DIT_SHAPES = {
    "tiny": None,
    "medium": dict(num_layers=4, num_attention_heads=4, attention_head_dim=64,
                   joint_attention_dim=256, pooled_projection_dim=256),
    "llama-3.2-1b": dict(num_layers=24, num_attention_heads=24, attention_head_dim=64,
                         joint_attention_dim=4096, pooled_projection_dim=2048),
}


class NaiveDualTower(DualTower):
    """The reference the dual tower must not be: both towers on every token, then select."""

    def forward(self, h: torch.Tensor, ctx) -> torch.Tensor:
        out = {}
        for _, layer, tower in self.towers():
            route, a = attend(h, ctx, self.index, tower, {TXT: layer, IMG: layer},
                              {TXT: layer, IMG: layer})
            out[tower] = finish(gather(h, route), a, layer, layer)  # (B*L, D) every token
        is_image = torch.zeros(ctx.B * ctx.L, 1, dtype=torch.bool, device=h.device)
        is_image = is_image.index_fill(0, ctx.routes[IMG].flat, True)
        return torch.where(is_image, out["vision"], out["text"]).view(ctx.B, ctx.L, -1)


def build(variant: str, shape: dict, latent_channels: int, device: str,
          dit: dict | None = None) -> XFusionModel:
    """`dit`: x_fuse_dit's vision tower shape (model.dit.tiny), else config/tiny.yaml's."""
    raw = apply_overrides(load_yaml("config/tiny.yaml"), {
        "model.architecture": "dual_tower" if variant == "naive_dual_tower" else variant,
        "model.codec.latent_channels": latent_channels, **({"model.dit.tiny": dit} if dit else {})})
    config = LlamaConfig(**shape, tie_word_embeddings=True)
    config._attn_implementation = "sdpa"
    with torch.device(device):
        llm = LlamaForCausalLM(config)
        model = XFusionModel.from_base(run_from_dict(raw), llm, IDS,
                                       base_ref={"path": "benchmark", "tokenizer": None,
                                                 "text_weight_hash": ""})
    if variant == "naive_dual_tower":
        for block in model.blocks:
            block.__class__ = NaiveDualTower  # same weights, naive routing
    return model


def stack_flops(model: XFusionModel, batch, device: str) -> int:
    """FLOPs of the decoder stack on the batch's layout (the layout itself stays on the CPU)."""
    B, L = batch.input_ids.shape
    embeds = torch.zeros(B, L, model.llm.config.hidden_size, device=device)
    mask = attention_mask(batch.span_ids, batch.valid).to(device)
    ctx = model._context(embeds, batch.image_mask, position_ids(batch.valid).to(device), mask,
                         t=batch.t.to(device))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model._layers(embeds, ctx)
    return counter.get_total_flops()


def main() -> None:
    for name, (shape, latent, n_caption) in SHAPES.items():
        device = "cpu" if name == "tiny" else "meta"
        caption = list(range(5, 5 + n_caption))
        samples = [Sample("t2i", caption, torch.zeros(latent), 0.5),
                   Sample("t2i", caption[: n_caption // 2], torch.zeros(latent), 0.5),
                   Sample("i2t", caption, torch.zeros(latent), 0.0)]
        batch = build_batch(samples, IDS, patch_size=2)
        base = stack_flops(build("single_tower", shape, latent[0], device), batch, device)
        flops = {}
        for variant in VARIANTS:
            flops[variant] = stack_flops(build(variant, shape, latent[0], device,
                                               DIT_SHAPES.get(name)), batch, device)
            print(f"ratio flops.{name}.{variant}/single_tower {flops[variant] / base:.3f}",
                  flush=True)
        print(f"ratio flops.{name}.x_fuse_dit/dual_tower "
              f"{flops['x_fuse_dit'] / flops['dual_tower']:.3f}", flush=True)


if __name__ == "__main__":
    main()
