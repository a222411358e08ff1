"""The fine-tuning stream (Supp. B.1): batches of the four downstream tasks mixed by
`finetune.task_ratios`, addressed by step like xfusion.data.mixing.MixedStream.

Editing and painting examples are I2I samples (xfusion.model.sequence): the clean source image,
the instruction, then the target image noised with t from `training.timestep_sampling`, the
instruction dropped with probability `training.caption_dropout` (CFG at sampling keeps the
source). Localisation and VQA examples are VQA samples: the image noised with t <=
`training.i2t_noise_max` (0: clean), the question, the answer as text targets.

Images are encoded with the codec once, when the stream is built (the task records hold image
paths, not latents: at tiny scale encoding all of them takes seconds; at paper scale encode the
task images once like the training latents before a long run). Batch `step` is drawn from a
generator of (seed, step), each sample's flow noise from one of (seed, step, k), so a resumed
run sees the batches an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from xfusion.config import FINETUNE_TASKS, RunConfig
from xfusion.data import load_pixels, resolve_image
from xfusion.io import read_jsonl
from xfusion.model.flow import sample_t
from xfusion.model.sequence import Sample, encode_captions

GENERATION_TASKS = ("editing", "painting")  # I2I; the others are VQA-layout samples


@dataclass(frozen=True)
class TaskPlan:
    """One global batch: task and example per sample, t, dropped instructions, tokens by kind
    (`t2i_tokens`: image-generation samples, `i2t_tokens`: understanding samples, as the
    training log counts them)."""

    task: torch.Tensor  # (B,) index into FINETUNE_TASKS
    index: torch.Tensor  # (B,) example index within its task
    t: torch.Tensor  # (B,)
    drop_caption: torch.Tensor  # (B,) bool
    t2i_tokens: int
    i2t_tokens: int


@torch.no_grad()
def encode_images(paths: list[Path], codec, image_size: int, batch_size: int) -> torch.Tensor:
    """(N, C, h, w) latents of the images at `paths`, encoded in batches."""
    out = []
    for i in tqdm(range(0, len(paths), batch_size), desc="task images", unit="batch"):
        pixels = torch.stack([load_pixels(p, image_size) for p in paths[i:i + batch_size]])
        out.append(codec.encode(pixels).float())
    return torch.cat(out)


class TaskStream:
    """Batches of task `Sample`s for `xfusion.train` (the interface of MixedStream: `batch`,
    `noise`, `batch_size`, `accumulation`, `global_batch_size`).

    Args:
        tasks (Path): R/tasks/train/tasks.jsonl (xfusion.data.tasks).
        tokenizer: the run's tokenizer.
        cfg (RunConfig): `finetune` (ratios, batch size), `training` (noise, dropout, seed).
        codec: the run's image codec (xfusion.codec.build_codec).
    """

    def __init__(self, tasks: Path, tokenizer, cfg: RunConfig, codec, rank: int = 0,
                 world_size: int = 1):
        f, self.training, self.seed = cfg.finetune, cfg.training, cfg.training.seed
        rows = read_jsonl(tasks)
        self.rows = {t: [r for r in rows if r["task"] == t] for t in FINETUNE_TASKS}
        ratios = torch.tensor([float(f.task_ratios.get(t, 0.0)) for t in FINETUNE_TASKS])
        empty = [t for t, r in zip(FINETUNE_TASKS, ratios) if r > 0 and not self.rows[t]]
        if empty:
            raise SystemExit(f"{tasks}: no {', '.join(empty)} examples, but finetune.task_ratios "
                             "gives them a share; set it to 0 or add the examples")
        self.ratios = ratios / ratios.sum()
        if f.batch_size % world_size:
            raise SystemExit(f"config.finetune.batch_size = {f.batch_size}: must split evenly "
                             f"over {world_size} ranks")
        self.global_batch_size, self.batch_size, self.accumulation = (
            f.batch_size, f.batch_size // world_size, 1)
        self.rank, self.world_size = rank, world_size
        budget = cfg.data.max_caption_tokens
        self.prompt_ids, self.answer_ids, self.source, self.target = {}, {}, {}, {}
        for task, task_rows in self.rows.items():
            if not task_rows:
                continue
            self.prompt_ids[task] = encode_captions(tokenizer, [r["prompt"] for r in task_rows],
                                                    budget)
            if task in GENERATION_TASKS:
                self.target[task] = encode_images(
                    [resolve_image(r["target"], tasks) for r in task_rows], codec,
                    cfg.data.image_size, cfg.data.encode_batch_size)
            else:
                self.answer_ids[task] = encode_captions(
                    tokenizer, [r["answer"] for r in task_rows], budget)
            self.source[task] = encode_images(
                [resolve_image(r["source"], tasks) for r in task_rows], codec,
                cfg.data.image_size, cfg.data.encode_batch_size)
        shape = next(iter(self.source.values())).shape[1:]
        self.latent_shape = tuple(shape)
        p = cfg.model.patch_size
        self.image_tokens = (shape[1] // p) * (shape[2] // p)

    def _generator(self, *key: int) -> torch.Generator:
        digest = hashlib.sha256(repr((self.seed, "tasks", *key)).encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)

    def plan(self, step: int) -> TaskPlan:
        B, t = self.global_batch_size, self.training
        g = self._generator(2, step)
        task = torch.multinomial(self.ratios, B, replacement=True, generator=g)
        u = torch.rand(B, generator=g)  # example index = floor(u * examples of its task)
        m, s = t.timestep_logit_mean, t.timestep_logit_std
        t_gen = sample_t(B, t.timestep_sampling, g, m=m, s=s)
        t_und = sample_t(B, t.timestep_sampling, g, t_max=t.i2t_noise_max, m=m, s=s)
        drop = torch.rand(B, generator=g) < t.caption_dropout
        sizes = torch.tensor([len(self.rows[name]) for name in FINETUNE_TASKS])
        index = (u * sizes[task]).long().clamp(max=(sizes[task] - 1).clamp(min=0))
        generation = torch.tensor([FINETUNE_TASKS[k] in GENERATION_TASKS for k in task.tolist()])
        tokens = [self._tokens(FINETUNE_TASKS[k], int(i)) for k, i in zip(task.tolist(),
                                                                         index.tolist())]
        return TaskPlan(task=task, index=index, t=torch.where(generation, t_gen, t_und),
                        drop_caption=drop & generation,
                        t2i_tokens=sum(n for n, gen in zip(tokens, generation) if gen),
                        i2t_tokens=sum(n for n, gen in zip(tokens, generation) if not gen))

    def _tokens(self, task: str, i: int) -> int:
        """Tokens of the example's layout (xfusion.model.sequence): I2I two images + 5 specials,
        VQA one image + 4."""
        text = len(self.prompt_ids[task][i]) + (len(self.answer_ids[task][i])
                                                if task in self.answer_ids else 0)
        return text + (2 * self.image_tokens + 5 if task in GENERATION_TASKS
                       else self.image_tokens + 4)

    def sample(self, task: str, i: int, t: float, drop: bool = False) -> Sample:
        if task in GENERATION_TASKS:
            return Sample("i2i", [], self.target[task][i], t, drop_caption=drop,
                          prompt_ids=self.prompt_ids[task][i],
                          source_latents=self.source[task][i])
        return Sample("vqa", self.answer_ids[task][i], self.source[task][i], t,
                      prompt_ids=self.prompt_ids[task][i])

    def _part(self, micro: int) -> range:
        if micro != 0:
            raise IndexError(f"micro-batch {micro}: a fine-tuning step has one")
        return range(self.rank, self.global_batch_size, self.world_size)

    def batch(self, step: int, micro: int = 0) -> tuple[list[Sample], TaskPlan]:
        plan = self.plan(step)
        return [self.sample(FINETUNE_TASKS[int(plan.task[k])], int(plan.index[k]),
                            float(plan.t[k]), bool(plan.drop_caption[k]))
                for k in self._part(micro)], plan

    def noise(self, step: int, micro: int = 0) -> torch.Tensor:
        return torch.stack([torch.randn(self.latent_shape, generator=self._generator(3, step, k))
                            for k in self._part(micro)])
