"""Samples and batches: the token layouts of T2I and I2T, noised latents, targets.

Layouts (Transfusion-style; IMG marks the P image-token slots of the sample's `latents`):
  T2I: [bos] caption [BOI] IMG*P [EOI]          (the caption dropped for CFG: [bos] [BOI] ...)
  I2T: [bos] [BOI] IMG*P [EOI] caption [eos]
  I2I: [bos] [BOI] SRC*P [EOI] instruction [BOI] IMG*P [EOI]   (editing, in/out-painting: the
       clean source image's P tokens, t = 0, are context; the instruction dropped for CFG)
  VQA: [bos] [BOI] IMG*P [EOI] question answer [eos]           (VQA, localisation)
Text targets are the caption tokens (and eos) of I2T samples and the answer tokens (and eos) of
VQA samples only. The source image of I2I is its own image span (bidirectional within itself),
routed to the vision tower like any image, and gets no flow loss: `MultimodalBatch.target_mask`
marks the one image per row that is denoised (Supp. B.1's fine-tuning tasks, xfusion.data.tasks). The DM loss covers T2I
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
LAYOUTS = ("t2i", "i2t", "i2i", "vqa")


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
    task: str  # one of LAYOUTS
    # caption tokens (a leading bos, as tokenizers add, is dropped); VQA: the answer; I2I: unused
    caption_ids: list[int]
    latents: torch.Tensor  # (C, h, w) clean latents (I2I: the target image)
    t: float  # noise level in [0, 1]: 1 = pure noise
    drop_caption: bool = False  # T2I / I2I: train the unconditional branch of CFG
    target_feats: torch.Tensor | None = None  # REPA targets: (F,) pooled or (P, F) per token
    prompt_ids: list[int] | None = None  # I2I: the instruction; VQA: the question
    source_latents: torch.Tensor | None = None  # I2I: (C, h, w) the clean source image


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
    # Batches with I2I samples: (B, C, h, w) clean source latents (zeros in other rows) and
    # (B, L) bool their slots, a part of image_mask; None in batches without I2I samples.
    source_latents: torch.Tensor | None = None
    source_mask: torch.Tensor | None = None

    @property
    def target_mask(self) -> torch.Tensor:
        """(B, L) bool: the P slots per row of the image that is denoised (`noisy_latents`)."""
        return self.image_mask if self.source_mask is None else self.image_mask & ~self.source_mask

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


def prompt_tokens(task: str, caption: list[int], ids: SpecialIds, drop_caption: bool = False,
                  prompt: list[int] | None = None):
    """(tokens before the image, tokens after it) of one sample's layout; I2I: `i2i_prefix`
    first, then these T2I tokens around the target with the prefix in place of [bos]."""
    caption = caption_tokens(caption, ids)
    if task == "t2i":
        return [ids.bos] + ([] if drop_caption else caption) + [ids.boi], [ids.eoi]
    if task == "i2t":
        return [ids.bos, ids.boi], [ids.eoi] + caption + [ids.eos]
    if task == "vqa":  # caption = the answer (empty at sampling: the prefix ends at the question)
        question = caption_tokens(prompt or [], ids)
        return [ids.bos, ids.boi], [ids.eoi] + question + caption + ([ids.eos] if caption else [])
    raise ValueError(f"sample task {task!r}: must be one of {', '.join(LAYOUTS)}")


def i2i_prefix(instruction: list[int], ids: SpecialIds, P: int,
               drop_instruction: bool = False) -> tuple[list[int], int]:
    """([bos] [BOI] SRC*P [EOI] instruction [BOI], where the P source slots start): the tokens
    before an I2I target image; the source slots hold the pad id."""
    instruction = [] if drop_instruction else caption_tokens(instruction, ids)
    return [ids.bos, ids.boi] + [ids.pad] * P + [ids.eoi] + instruction + [ids.boi], 2


def dm_weight(sample: Sample, i2t_denoise_loss: bool) -> float:
    """1 where the sample's image is a denoising example: every T2I and I2I target image, and an
    I2T (or VQA) image noised with t > 0 when `i2t_denoise_loss` (training.i2t_denoise_loss)
    is on; else 0."""
    if sample.task in ("t2i", "i2i"):
        return 1.0
    return float(i2t_denoise_loss and sample.t > 0)


def sample_tokens(s: Sample, ids: SpecialIds, P: int) -> tuple[list[int], int, int | None, int]:
    """(the row with pad ids in image slots, where the target image starts, where the source
    image starts or None, how many text targets follow the target's [EOI]: the first at [EOI]
    + the question's length)."""
    if s.task == "i2i":
        if s.source_latents is None or not s.prompt_ids and not s.drop_caption:
            raise ValueError("an i2i sample needs source_latents and prompt_ids (the instruction)")
        before, source = i2i_prefix(s.prompt_ids or [], ids, P, s.drop_caption)
        return before + [ids.pad] * P + [ids.eoi], len(before), source, 0
    if s.task == "vqa" and not caption_tokens(s.caption_ids, ids):
        raise ValueError("a vqa training sample needs its answer (caption_ids)")
    drop = s.drop_caption and s.task == "t2i"
    before, after = prompt_tokens(s.task, s.caption_ids, ids, drop, s.prompt_ids)
    n_text = len(caption_tokens(s.caption_ids, ids)) + 1 if s.task in ("i2t", "vqa") else 0
    return before + [ids.pad] * P + after, len(before), None, n_text


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
    layouts = []
    for s in samples:
        for name, lat in (("latents", s.latents), ("source_latents", s.source_latents)):
            if lat is not None and tuple(lat.shape) != (C, h, w):
                raise ValueError(f"{name} of shape {tuple(lat.shape)} in a batch of {(C, h, w)}")
        layouts.append(sample_tokens(s, ids, P))
    B, L = len(samples), max(len(row) for row, *_ in layouts)
    input_ids = torch.full((B, L), ids.pad, dtype=torch.long)
    valid = torch.zeros(B, L, dtype=torch.bool)
    image_mask = torch.zeros(B, L, dtype=torch.bool)
    span_ids = torch.zeros(B, L, dtype=torch.long)
    text_targets = torch.full((B, L), IGNORE, dtype=torch.long)
    has_source = any(source is not None for _, _, source, _ in layouts)
    source_mask = torch.zeros(B, L, dtype=torch.bool) if has_source else None
    for b, (row, start, source, n) in enumerate(layouts):
        input_ids[b, :len(row)] = torch.tensor(row)
        valid[b, :len(row)] = True
        image_mask[b, start:start + P] = True
        span_ids[b, start:start + P] = 1 if source is None else 2  # the source is span 1
        if source is not None:
            image_mask[b, source:source + P] = True
            span_ids[b, source:source + P] = 1
            source_mask[b, source:source + P] = True
        first = len(row) - 1 - n  # the position before each text target predicts it
        text_targets[b, first:first + n] = input_ids[b, first + 1:first + 1 + n]
    x0 = torch.stack([s.latents for s in samples]).float()
    noise = torch.randn(x0.shape, generator=generator) if noise is None else noise.float()
    t = torch.tensor([s.t for s in samples], dtype=torch.float32)
    feats = [s.target_feats for s in samples]
    if any(f is None for f in feats) and not all(f is None for f in feats):
        raise ValueError("target_feats given for some samples of the batch but not all")
    sources = None
    if has_source:
        sources = torch.stack([torch.zeros(C, h, w) if s.source_latents is None
                               else s.source_latents.float() for s in samples])
    return MultimodalBatch(
        input_ids=input_ids, image_mask=image_mask, span_ids=span_ids, valid=valid,
        noisy_latents=add_noise(x0, noise, t), t=t, velocity_target=velocity_target(x0, noise),
        text_targets=text_targets,
        dm_weight=torch.tensor([dm_weight(s, i2t_denoise_loss) for s in samples]),
        target_feats=None if feats[0] is None else torch.stack(feats).float(),
        source_latents=sources, source_mask=source_mask)
