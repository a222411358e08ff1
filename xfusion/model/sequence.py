"""Samples and batches: the token layouts of T2I and I2T, noised latents, targets.

Layouts (Transfusion-style, one image per sample; IMG marks the P image-token slots):
  T2I: [bos] caption [BOI] IMG*P [EOI]          (the caption dropped for CFG: [bos] [BOI] ...)
  I2T: [bos] [BOI] IMG*P [EOI] caption [eos]
Text targets are the caption tokens (and eos) of I2T samples only. The DM loss covers T2I
images and, with `training.i2t_denoise_loss` (the default), I2T images noised with t > 0: X-Fusion
Sec. 6.1 says Transfusion limits I2T noise to t <= 50 % "while still [treating] those noisy images
as generation training data", and that clean I2T images "reduce the amount of denoising data
available for generation". A clean I2T image (t = 0) has nothing to denoise and gets no DM loss;
without the switch, a noisy I2T image only conditions the caption.

References: X-Fusion Sec. 4 (training) and 6; Transfusion Sec. 3; SD3 rectified flow (flow.py).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import torch

from xfusion.model.flow import add_noise, velocity_target

IGNORE = -100  # target of positions without a text loss (torch's cross_entropy ignore_index)


@dataclass(frozen=True)
class SpecialIds:
    bos: int
    eos: int
    pad: int
    boi: int
    eoi: int

    @classmethod
    def from_tokenizer(cls, tok) -> "SpecialIds":
        from xfusion.tokenizer import image_token_ids  # the data stage's module

        boi, eoi = image_token_ids(tok)
        return cls(tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, boi, eoi)


@dataclass
class Sample:
    task: str  # "t2i" | "i2t"
    caption_ids: list[int]  # caption tokens (a leading bos, as tokenizers add, is dropped)
    latents: torch.Tensor  # (C, h, w) clean latents
    t: float  # noise level in [0, 1]: 1 = pure noise
    drop_caption: bool = False  # T2I: train the unconditional branch of CFG
    target_feats: torch.Tensor | None = None  # REPA targets: (F,) pooled or (P, F) per token


@dataclass
class MultimodalBatch:
    input_ids: torch.Tensor  # (B, L) long; image slots hold the pad id
    image_mask: torch.Tensor  # (B, L) bool, P True per row
    span_ids: torch.Tensor  # (B, L) long: 1 on the image span, 0 elsewhere
    valid: torch.Tensor  # (B, L) bool: False at padding
    noisy_latents: torch.Tensor  # (B, C, h, w) x_t
    t: torch.Tensor  # (B,)
    velocity_target: torch.Tensor  # (B, C, h, w) eps - x0
    text_targets: torch.Tensor  # (B, L) long: the next token at I2T caption positions, else IGNORE
    dm_weight: torch.Tensor  # (B,) 1 for T2I images (and noisy I2T ones, see dm_weight), else 0
    target_feats: torch.Tensor | None = None  # (B, F) or (B, P, F)

    def to(self, device) -> "MultimodalBatch":
        return MultimodalBatch(**{f.name: None if getattr(self, f.name) is None
                                  else getattr(self, f.name).to(device) for f in fields(self)})


def encode_captions(tokenizer, captions: Sequence[str], max_tokens: int) -> list[list[int]]:
    """Caption ids as every sample holds them (training, sampling, the linear probe): the
    tokenizer's ids without special tokens (the layout adds bos/boi/eoi/eos), the first
    `max_tokens` (`data.max_caption_tokens`) of each."""
    return [ids[:max_tokens]
            for ids in tokenizer(list(captions), add_special_tokens=False)["input_ids"]]


def caption_tokens(caption_ids: list[int], ids: SpecialIds) -> list[int]:
    return list(caption_ids[1:] if caption_ids[:1] == [ids.bos] else caption_ids)


def prompt_tokens(task: str, caption: list[int], ids: SpecialIds, drop_caption: bool = False):
    """(tokens before the image, tokens after it) of one sample's layout."""
    caption = caption_tokens(caption, ids)
    if task == "t2i":
        return [ids.bos] + ([] if drop_caption else caption) + [ids.boi], [ids.eoi]
    if task == "i2t":
        return [ids.bos, ids.boi], [ids.eoi] + caption + [ids.eos]
    raise ValueError(f"sample task {task!r}: must be 't2i' or 'i2t'")


def dm_weight(sample: Sample, i2t_denoise_loss: bool) -> float:
    """1 where the sample's image is a denoising example: every T2I image, and an I2T image
    noised with t > 0 when `i2t_denoise_loss` (training.i2t_denoise_loss) is on; else 0."""
    if sample.task == "t2i":
        return 1.0
    return float(i2t_denoise_loss and sample.t > 0)


def build_batch(samples: list[Sample], ids: SpecialIds, patch_size: int,
                generator: torch.Generator | None = None,
                noise: torch.Tensor | None = None,
                i2t_denoise_loss: bool = True) -> MultimodalBatch:
    """Lay out, right-pad and noise a list of samples: with `noise` (B, C, h, w) when given (the
    training stream's per-sample draws), else drawn from `generator`. `i2t_denoise_loss`: noisy
    I2T images get the DM loss too (`dm_weight`)."""
    if not samples:
        raise ValueError("build_batch: no samples")
    C, h, w = samples[0].latents.shape
    P = (h // patch_size) * (w // patch_size)
    rows, starts, n_caption = [], [], []
    for s in samples:
        if tuple(s.latents.shape) != (C, h, w):
            raise ValueError(f"latents of shape {tuple(s.latents.shape)} in a batch of {(C, h, w)}")
        drop = s.drop_caption and s.task == "t2i"
        before, after = prompt_tokens(s.task, s.caption_ids, ids, drop)
        rows.append(before + [ids.pad] * P + after)
        starts.append(len(before))
        n_caption.append(len(after) - 1 if s.task == "i2t" else 0)  # caption + eos after [EOI]
    B, L = len(samples), max(map(len, rows))
    input_ids = torch.full((B, L), ids.pad, dtype=torch.long)
    valid = torch.zeros(B, L, dtype=torch.bool)
    image_mask = torch.zeros(B, L, dtype=torch.bool)
    text_targets = torch.full((B, L), IGNORE, dtype=torch.long)
    for b, (row, start, n) in enumerate(zip(rows, starts, n_caption)):
        input_ids[b, :len(row)] = torch.tensor(row)
        valid[b, :len(row)] = True
        image_mask[b, start:start + P] = True
        eoi = start + P  # the [EOI] position predicts the first caption token
        text_targets[b, eoi:eoi + n] = input_ids[b, eoi + 1:eoi + 1 + n]
    x0 = torch.stack([s.latents for s in samples]).float()
    noise = torch.randn(x0.shape, generator=generator) if noise is None else noise.float()
    t = torch.tensor([s.t for s in samples], dtype=torch.float32)
    feats = [s.target_feats for s in samples]
    if any(f is None for f in feats) and not all(f is None for f in feats):
        raise ValueError("target_feats given for some samples of the batch but not all")
    return MultimodalBatch(
        input_ids=input_ids, image_mask=image_mask, span_ids=image_mask.long(), valid=valid,
        noisy_latents=add_noise(x0, noise, t), t=t, velocity_target=velocity_target(x0, noise),
        text_targets=text_targets,
        dm_weight=torch.tensor([dm_weight(s, i2t_denoise_loss) for s in samples]),
        target_feats=None if feats[0] is None else torch.stack(feats).float())
