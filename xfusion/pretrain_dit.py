"""x_fuse_dit's pretrained DiT: pretrain a tiny text-to-image MMDiT (tiny), or name one (paper).

`python -m xfusion.pretrain_dit --config C --run RUN --tokenizer R/tokenizer --latents R/latents/train.safetensors --captions R/captions/train.jsonl --out R/dit/<name>`

Tiny scale (`model.dit.source: tiny`): the stand-in for the paper's in-house text-to-image DiT
(X-Fusion Sec. 7.2). A diffusers SD3Transformer2DModel of shape `model.dit.tiny` learns rectified
flow (xfusion.model.flow, logit-normal t with the run's m, s) on the same codec latents and
captions as X-Fusion training. Its text encoder is a learned token embedding table over our
tokenizer (`text_embed`): the caption's embeddings are the MMDiT's context tokens and their mean
its pooled vector; a dropped caption (`model.dit.pretrain_caption_dropout`) is one pad token with
pooled 0, the unconditional input that x_fuse_dit keeps for its timestep conditioning. The
output is read as `model.prediction` says (x0 for the tiny pixel codec, as X-Fusion's). Same
engine, checkpoints, automatic resume and pinned numerics as the base LLM's pretraining
(xfusion.pretrain_lm). Writes `hf/` (the SD3Transformer2DModel, save_pretrained),
`text_embed.safetensors` and `dit_model.json`.

Paper scale (`source: pretrained`): nothing is trained; `dit_model.json` names `model.dit.path`
and `subfolder`, which xfusion.train loads into the vision tower (xfusion.model.dit.load_mmdit_).

References: Esser et al. 2024 (SD3); diffusers transformer_sd3.py; xfusion/pretrain_lm.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from xfusion import checkpoint
from xfusion.config import RunConfig, load_run
from xfusion.data.mixing import read_captions
from xfusion.engine import Engine, rank
from xfusion.io import atomic_dir, atomic_write_json
from xfusion.latents import load_latents
from xfusion.model.sequence import encode_captions
from xfusion.model.flow import add_noise, sample_t, to_timestep, velocity_target
from xfusion.model.xfusion import T_MIN
from xfusion.pretrain_lm import NUMERICS_ENV, pin_numerics
from xfusion.tokenizer import load_tokenizer

DIT_FILE = "dit_model.json"


class TinyTextToImageDiT(nn.Module):
    """An SD3Transformer2DModel and its text encoder, a token embedding table."""

    def __init__(self, cfg: RunConfig, vocab_size: int, latent_hw: tuple[int, int]):
        super().__init__()
        tiny, p = cfg.model.dit.tiny, cfg.model.patch_size
        width = tiny.num_attention_heads * tiny.attention_head_dim
        self.text_embed = nn.Embedding(vocab_size, tiny.joint_attention_dim)
        self.pool = nn.Linear(tiny.joint_attention_dim, tiny.pooled_projection_dim, bias=False)
        self.transformer = SD3Transformer2DModel(
            sample_size=latent_hw[0], patch_size=p, in_channels=cfg.model.codec.latent_channels,
            out_channels=cfg.model.codec.latent_channels, num_layers=tiny.num_layers,
            attention_head_dim=tiny.attention_head_dim,
            num_attention_heads=tiny.num_attention_heads,
            joint_attention_dim=tiny.joint_attention_dim, caption_projection_dim=width,
            pooled_projection_dim=tiny.pooled_projection_dim,
            pos_embed_max_size=max(latent_hw) // p)
        self.prediction = cfg.model.prediction

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, ids: torch.Tensor,
                keep: torch.Tensor) -> torch.Tensor:
        """Velocity (B, C, h, w) at x_t for (B, T) caption ids (pad-filled) and (B, T) `keep`,
        the caption tokens (none: a dropped caption)."""
        e = self.text_embed(ids)  # (B, T, J)
        pooled = (e * keep[..., None]).sum(1) / keep.sum(1, keepdim=True).clamp(min=1)
        pooled = self.pool(pooled) * keep.any(1, keepdim=True)  # dropped: exactly 0
        out = self.transformer(x_t, encoder_hidden_states=e, pooled_projections=pooled,
                               timestep=to_timestep(t)).sample
        if self.prediction == "velocity":
            return out
        return (x_t - out) / t.clamp(min=T_MIN).view(-1, 1, 1, 1)  # x0 -> velocity (JiT)


def caption_batch(token_lists: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids right-padded with `pad` and (B, T) bool of real tokens; an empty list (a
    dropped caption) is one pad token."""
    T = max(1, max(len(t) for t in token_lists))
    ids = torch.full((len(token_lists), T), pad, dtype=torch.long)
    keep = torch.zeros(len(token_lists), T, dtype=torch.bool)
    for i, tokens in enumerate(token_lists):
        ids[i, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        keep[i, :len(tokens)] = True
    return ids, keep


def pretrain(cfg: RunConfig, tokenizer_dir: Path, latents_path: Path, captions_path: Path,
             out: Path) -> dict:
    """Pretrain the tiny DiT with checkpoint/resume (pinned numerics); returns the last loss."""
    with pin_numerics():
        return _pretrain(cfg, tokenizer_dir, latents_path, captions_path, out)


def _pretrain(cfg: RunConfig, tokenizer_dir: Path, latents_path: Path, captions_path: Path,
              out: Path) -> dict:
    dit, t_cfg = cfg.model.dit, cfg.training
    # Setup: seed, data, model, engine.
    torch.manual_seed(t_cfg.seed)
    tok = load_tokenizer(tokenizer_dir)
    latents, ids = load_latents(latents_path)  # (N, C, h, w)
    captions = encode_captions(tok, read_captions(captions_path, ids), cfg.data.max_caption_tokens)
    model = TinyTextToImageDiT(cfg, len(tok), tuple(latents.shape[-2:]))
    training = dataclasses.replace(t_cfg, steps=dit.pretrain_steps, lr=dit.pretrain_lr,
                                   warmup_steps=dit.pretrain_warmup_steps)
    engine = Engine(model, [{"params": list(model.parameters()), "lr": dit.pretrain_lr}],
                    training, micro_batch_size=dit.pretrain_batch_size, lr_decay="cosine")
    identity = {"variant": "pretrain_dit", "base_model_hash": None,
                "dit": json.loads(json.dumps(dataclasses.asdict(dit)))}
    ckpt_dir, start = out / "checkpoints", 0
    if (latest := checkpoint.latest(ckpt_dir)) is not None:  # resume after a kill
        ckpt = checkpoint.load(latest, identity)
        engine.load(ckpt.engine_dir)
        checkpoint.set_rng_state(ckpt.rng)
        start = ckpt.step
        print(f"resuming {out} from step {start}")

    # Loop: batches, t and noise drawn from (seed, step), so a resumed run draws the same ones.
    model.train()
    bar = tqdm(range(start, dit.pretrain_steps), initial=start, total=dit.pretrain_steps,
               desc=f"pretrain {dit.name}", disable=rank() != 0)
    loss = torch.zeros(())
    for step in bar:
        g = torch.Generator().manual_seed(t_cfg.seed * 1_000_003 + step)
        index = torch.randint(0, len(latents), (dit.pretrain_batch_size,), generator=g)
        drop = torch.rand(len(index), generator=g) < dit.pretrain_caption_dropout
        text, keep = caption_batch([[] if d else captions[i]
                                    for i, d in zip(index.tolist(), drop.tolist())], tok.pad_token_id)
        x0 = latents[index].float()
        t = sample_t(len(index), t_cfg.timestep_sampling, g, m=t_cfg.timestep_logit_mean,
                     s=t_cfg.timestep_logit_std)
        noise = torch.randn(x0.shape, generator=g)
        dev = engine.device
        v = engine.module(add_noise(x0, noise, t).to(dev), t.to(dev), text.to(dev), keep.to(dev))
        loss = F.mse_loss(v.float(), velocity_target(x0, noise).to(dev))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"pretrain_dit step {step + 1}: loss is {loss.item()}")
        engine.backward(loss)
        engine.step()
        if (step + 1) % t_cfg.log_every == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{engine.lr:.2e}")
        if (step + 1) % t_cfg.checkpoint_every == 0 and step + 1 < dit.pretrain_steps:
            checkpoint.save(ckpt_dir, step + 1, model=model, save_engine=engine.save,
                            data_state={"step": step + 1}, meta=identity,
                            keep_last=t_cfg.keep_last)

    result = {"path": "hf", "subfolder": None, "steps": dit.pretrain_steps,
              "final_loss": float(loss.item())}
    if rank() == 0:
        with atomic_dir(out / "hf") as tmp:
            model.transformer.save_pretrained(tmp)
        save_file({k: v.detach().cpu().contiguous() for k, v in
                   {"text_embed": model.text_embed.weight, "pool": model.pool.weight}.items()},
                  str(out / ".text_embed.tmp.safetensors"))
        os.replace(out / ".text_embed.tmp.safetensors", out / "text_embed.safetensors")
        atomic_write_json(out / DIT_FILE, result)
    return result


def load_tiny_dit(dit_dir: Path, cfg: RunConfig, vocab_size: int,
                  latent_hw: tuple[int, int]) -> TinyTextToImageDiT:
    """The DiT and text encoder that `pretrain` wrote to `dit_dir` (R/dit/<name>)."""
    model = TinyTextToImageDiT(cfg, vocab_size, latent_hw)
    model.transformer = SD3Transformer2DModel.from_pretrained(dit_dir / "hf")
    text = load_file(str(dit_dir / "text_embed.safetensors"))
    with torch.no_grad():
        model.text_embed.weight.copy_(text["text_embed"])
        model.pool.weight.copy_(text["pool"])
    return model.eval()


@torch.no_grad()
def generate(model: TinyTextToImageDiT, prompt_ids: list[list[int]], pad: int,
             noise: torch.Tensor, steps: int, cfg_scale: float, shift: float) -> torch.Tensor:
    """Latents (B, C, h, w) from `noise` for B prompts: the Euler flow sampler of
    xfusion.sample.generate_images with classifier-free guidance on the dropped caption."""
    ids, keep = caption_batch(prompt_ids, pad)
    null_ids, null_keep = caption_batch([[]] * len(prompt_ids), pad)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    x = noise.float()
    for i, timestep in enumerate(scheduler.timesteps):
        t = scheduler.sigmas[i].expand(len(x))  # sigma = our t
        v = model(x, t, ids, keep)
        if cfg_scale != 1.0:
            v_null = model(x, t, null_ids, null_keep)
            v = v_null + cfg_scale * (v - v_null)
        x = scheduler.step(v, timestep, x).prev_sample
    return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--run", default=None, help="a run of config.experiments (its model.dit)")
    parser.add_argument("--tokenizer", required=True, type=Path, help="R/tokenizer")
    parser.add_argument("--latents", required=True, type=Path, help="R/latents/train.safetensors")
    parser.add_argument("--captions", required=True, type=Path, help="R/captions/train.jsonl")
    parser.add_argument("--out", required=True, type=Path, help="R/dit/<name>")
    args = parser.parse_args()
    for key, value in NUMERICS_ENV.items():  # before the first kernel: read once per process
        os.environ.setdefault(key, value)
    cfg = load_run(args.config, args.run)
    if cfg.model.dit.source == "pretrained":
        atomic_write_json(args.out / DIT_FILE, {"path": cfg.model.dit.path,
                                                "subfolder": cfg.model.dit.subfolder})
        print(f"wrote {args.out / DIT_FILE} for {cfg.model.dit.path}")
        return
    start = time.perf_counter()
    result = pretrain(cfg, args.tokenizer, args.latents, args.captions, args.out)
    print(f"{cfg.model.dit.name}: {result['steps']} steps, final loss {result['final_loss']:.4f}, "
          f"{time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
