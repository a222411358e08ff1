"""The training stream: T2I and I2T samples mixed by `training.t2i_ratio`, from stored latents.

Each sample of a batch is T2I with probability `t2i_ratio`, else I2T (X-Fusion Sec. 4 and
Fig. 5). T2I samples draw t from `training.timestep_sampling` (SD3's logit-normal) and drop their
caption with probability `training.caption_dropout` (so CFG works at sampling); I2T samples see
their image noised with t from the same distribution truncated to [0, `training.i2t_noise_max`]
(0 = clean, 1 = the generation setting; Sec. 6.1, xfusion.model.flow.sample_t).
Captions are truncated to `data.max_caption_tokens`. No VAE runs here: latents are stored once.

The stream is a pure function of (seed, step): batch `step` is drawn from a generator seeded by
both, and images are visited in seeded per-epoch permutations addressed by the global sample
index. A resumed run therefore continues with exactly the batches an uninterrupted one would see,
with no iterator state to save. Every rank draws the same global batch plan and splits it into
W x A parts (W ranks, A accumulation steps): micro-batch m of rank r is part p = m W + r, the
samples k with k % (W A) == p, so token counts are global on every rank. A sample's flow noise
is drawn from a generator of (seed, step, k): any split of the same global batch sees the same
noise, so 2 ranks x 1, 1 rank x 2 and 1 x 1 train on the same inputs.

Batch size: `training.tokens_per_batch` // the longest sample layout (image tokens + the caption
budget + bos/boi/eoi/eos; see xfusion.model.sequence), the paper's "0.8M tokens per batch",
global over ranks and accumulation; `training.micro_tokens_per_batch` // the same length is one
rank's micro-batch (`accumulation_steps`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from xfusion.config import ConfigError, RunConfig
from xfusion.data import records_by_id
from xfusion.model.flow import sample_t
from xfusion.model.sequence import Sample, encode_captions

SPECIAL_TOKENS_PER_SAMPLE = 4  # bos, boi, eoi, eos (I2T's layout, the longer one)


@dataclass(frozen=True)
class BatchPlan:
    """One global batch: which images, which task, which t, and the tokens it holds per task."""

    index: torch.Tensor  # (B,) image indices
    is_t2i: torch.Tensor  # (B,) bool
    t: torch.Tensor  # (B,) noise level per sample
    drop_caption: torch.Tensor  # (B,) bool, T2I only
    t2i_tokens: int
    i2t_tokens: int


def accumulation_steps(tokens_per_batch: int, micro_tokens_per_batch: int | None, seq_len: int,
                       world_size: int) -> tuple[int, int, int]:
    """(global samples, micro-batch samples per rank, accumulation steps) of a token budget:
    global = tokens_per_batch // seq_len, micro = micro_tokens_per_batch // seq_len (None/0: the
    whole per-rank share), accumulation = global / (micro x world), which must be exact."""
    key, micro_key = "config.training.tokens_per_batch", "config.training.micro_tokens_per_batch"
    total = tokens_per_batch // seq_len
    if total < world_size or total % world_size:
        raise ConfigError(f"{key} = {tokens_per_batch}: fits {total} samples of up to {seq_len} "
                          f"tokens, which do not split evenly over {world_size} ranks; make it a "
                          f"multiple of {world_size * seq_len}")
    micro = micro_tokens_per_batch // seq_len if micro_tokens_per_batch else total // world_size
    if micro < 1 or total % (micro * world_size):
        raise ConfigError(
            f"{micro_key} = {micro_tokens_per_batch} ({micro} samples of up to {seq_len} tokens "
            f"per rank) x {world_size} ranks does not divide {key} = {tokens_per_batch} "
            f"({total} samples): the global batch must be a whole number of micro-batches of "
            f"all ranks")
    return total, micro, total // (micro * world_size)


def read_captions(path: str | Path, ids: list[str]) -> list[str]:
    """Captions in the order of `ids` (the latents' order), by id (`records_by_id`)."""
    by_id = {i: row["caption"] for i, row in records_by_id(path, ("caption",)).items()}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise KeyError(f"{path}: no caption for {len(missing)} latents ids (e.g. {missing[:3]}); "
                       "encode latents from this captions file (python -m xfusion.latents)")
    return [by_id[i] for i in ids]


class MixedStream:
    """Batches of `Sample`s for training, addressed by step.

    Args:
        latents (Tensor): (N, C, h, w) stored latents (already scaled by the codec).
        captions (list[str]): N captions, aligned with `latents`.
        tokenizer: the run's tokenizer (captions are tokenized once, here).
        cfg (RunConfig): ratios, noise, dropout, token budget, seed, caption budget.
        target_feats (Tensor | None): (N, P, F) or (N, F) REPA targets, aligned with `latents`.
        rank, world_size (int): this process's share of each global batch.

    `batch_size` is the per-rank micro-batch, `accumulation` the micro-batches per step.
    """

    def __init__(self, latents: torch.Tensor, captions: list[str], tokenizer, cfg: RunConfig,
                 target_feats: torch.Tensor | None = None, rank: int = 0, world_size: int = 1):
        if len(captions) != latents.shape[0]:
            raise ValueError(f"{len(captions)} captions for {latents.shape[0]} latents")
        if target_feats is not None and target_feats.shape[0] != latents.shape[0]:
            raise ValueError(f"{target_feats.shape[0]} REPA targets for {latents.shape[0]} latents")
        self.latents, self.target_feats = latents, target_feats
        self.training, self.seed = cfg.training, cfg.training.seed
        self.rank, self.world_size = rank, world_size
        budget = cfg.data.max_caption_tokens
        self.caption_ids = encode_captions(tokenizer, captions, budget)
        _, h, w = latents.shape[1:]
        p = cfg.model.patch_size
        self.image_tokens = (h // p) * (w // p)
        self.seq_len = self.image_tokens + budget + SPECIAL_TOKENS_PER_SAMPLE
        self.global_batch_size, self.batch_size, self.accumulation = accumulation_steps(
            cfg.training.tokens_per_batch, cfg.training.micro_tokens_per_batch, self.seq_len,
            world_size)
        self._perm_epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def __len__(self) -> int:
        return self.latents.shape[0]

    def _generator(self, *key: int) -> torch.Generator:
        """A generator seeded by (seed, *key) through sha256: stable across Python versions,
        unlike hash(), and unrelated streams for neighbouring keys."""
        digest = hashlib.sha256(repr((self.seed, *key)).encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)

    def _indices(self, start: int, n: int) -> torch.Tensor:
        """Image indices of global samples start .. start + n: seeded permutation per epoch."""
        out = []
        for k in range(start, start + n):
            epoch, pos = divmod(k, len(self))
            if epoch != self._perm_epoch:
                self._perm_epoch = epoch
                self._perm = torch.randperm(len(self), generator=self._generator(1, epoch))
            out.append(int(self._perm[pos]))
        return torch.tensor(out, dtype=torch.long)

    def plan(self, step: int) -> BatchPlan:
        """The global batch of `step` (the same on every rank)."""
        B, t = self.global_batch_size, self.training
        g = self._generator(2, step)
        # Every draw has a fixed size whatever the outcomes, so batch `step` never depends on
        # another step's randomness.
        is_t2i = torch.rand(B, generator=g) < t.t2i_ratio
        m, s = t.timestep_logit_mean, t.timestep_logit_std
        t_t2i = sample_t(B, t.timestep_sampling, g, m=m, s=s)
        t_i2t = sample_t(B, t.timestep_sampling, g, t_max=t.i2t_noise_max, m=m, s=s)
        drop = (torch.rand(B, generator=g) < t.caption_dropout) & is_t2i
        index = self._indices(step * B, B)
        lengths = torch.tensor([len(self.caption_ids[i]) for i in index.tolist()])
        # T2I: bos caption boi IMG eoi; I2T: bos boi IMG eoi caption eos (xfusion.model.sequence).
        t2i_len = self.image_tokens + 3 + torch.where(drop, 0, lengths)
        i2t_len = self.image_tokens + 4 + lengths
        return BatchPlan(index=index, is_t2i=is_t2i, t=torch.where(is_t2i, t_t2i, t_i2t),
                         drop_caption=drop, t2i_tokens=int(t2i_len[is_t2i].sum()),
                         i2t_tokens=int(i2t_len[~is_t2i].sum()))

    def batch(self, step: int, micro: int = 0) -> tuple[list[Sample], BatchPlan]:
        """This rank's micro-batch `micro` of batch `step`, and the global plan (token counts)."""
        plan = self.plan(step)
        samples = []
        for k in self._part(micro):
            i = int(plan.index[k])
            samples.append(Sample(
                task="t2i" if plan.is_t2i[k] else "i2t", caption_ids=self.caption_ids[i],
                latents=self.latents[i], t=float(plan.t[k]),
                drop_caption=bool(plan.drop_caption[k]),
                target_feats=None if self.target_feats is None else self.target_feats[i]))
        return samples, plan

    def _part(self, micro: int) -> range:
        """Global sample indices of this rank's micro-batch `micro` (part m W + r of W A)."""
        if not 0 <= micro < self.accumulation:
            raise IndexError(f"micro-batch {micro}: a step has {self.accumulation}")
        parts = self.world_size * self.accumulation
        return range(micro * self.world_size + self.rank, self.global_batch_size, parts)

    def noise(self, step: int, micro: int = 0) -> torch.Tensor:
        """(b, C, h, w) flow noise of micro-batch `micro`: sample k's from a generator of
        (seed, step, k), the same whichever rank or micro-batch holds it."""
        shape = tuple(self.latents.shape[1:])
        return torch.stack([torch.randn(shape, generator=self._generator(3, step, k))
                            for k in self._part(micro)])
