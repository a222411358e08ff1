"""A model's outputs on the downstream tasks (Supp. B.1; task data: xfusion.data.tasks).

Editing and painting: image-conditioned generation with the KV-cached sampler
(`sample.generate_images(..., sources=)`: the clean source image and the instruction are cached
once, CFG drops the instruction); localisation and VQA: greedy answers after the image and the
question (`sample.generate_captions(..., questions=)`). Example i's noise is seeded by
(seed, i), so the same model gives the same outputs.

    outputs = predict_tasks(model, rows, tasks_jsonl, evaluation, seed, out_dir)

`out_dir/<id>.png` per image output; each returned entry is `{"id", "task", "output"}` with the
output image's path or the answer text.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from xfusion.codec import build_codec
from xfusion.config import EvaluationConfig
from xfusion.data import load_pixels, resolve_image
from xfusion.data.tasks import IMAGE_TASKS
from xfusion.model.sequence import encode_captions
from xfusion.model.xfusion import XFusionModel
from xfusion.sample import generate_captions, generate_images, latent_shape, save_pixels


@torch.no_grad()
def predict_tasks(model: XFusionModel, rows: list[dict], jsonl: Path, ev: EvaluationConfig,
                  seed: int, out_dir: Path) -> list[dict]:
    codec = build_codec(model.cfg.model.codec).to(model.device)
    size, budget = model.cfg.data.image_size, model.cfg.data.max_caption_tokens
    shape = latent_shape(model)
    outputs: dict[str, dict] = {}
    for image_task in (True, False):
        todo = [(i, r) for i, r in enumerate(rows) if (r["task"] in IMAGE_TASKS) == image_task]
        for start in tqdm(range(0, len(todo), ev.sample_batch_size), unit="batch",
                          desc="task images" if image_task else "task answers"):
            batch = todo[start:start + ev.sample_batch_size]
            pixels = torch.stack([load_pixels(resolve_image(r["source"], jsonl), size)
                                  for _, r in batch]).to(model.device)
            sources = codec.encode(pixels).float()
            prompts = encode_captions(model.tokenizer, [r["prompt"] for _, r in batch], budget)
            if image_task:
                noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(
                    seed * 1_000_003 + i)) for i, _ in batch])
                latents = generate_images(model, prompts, ev.sample_steps, ev.cfg_scale,
                                          noise=noise, shift=ev.sample_shift, sources=sources)
                for (_, r), px in zip(batch, codec.decode(latents)):
                    save_pixels(px, out_dir / f"{r['id']}.png")
                    outputs[r["id"]] = {"id": r["id"], "task": r["task"],
                                        "output": str(out_dir / f"{r['id']}.png")}
            else:
                answers = generate_captions(model, sources, ev.caption_max_tokens,
                                            questions=prompts)
                for (_, r), ids in zip(batch, answers):
                    outputs[r["id"]] = {"id": r["id"], "task": r["task"], "output":
                                        model.tokenizer.decode(ids, skip_special_tokens=True)}
    return [outputs[r["id"]] for r in rows]
