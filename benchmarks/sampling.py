"""Speed-up of the KV caches of sampling, each measured against recomputation in the same run.

T2I: 50 flow steps with CFG; cached = the prompt's keys/values once, then image tokens only per
step; uncached = the whole prompt + image sequence at every step. I2T: caption decoding with a
KV cache against re-running the whole sequence for every new token. Tiny model shape (config/
tiny.yaml: hidden 128, 4 layers, 16 image tokens; 40 prompt tokens, 48 caption tokens, batch 32),
dual_tower, untrained weights (speed only).

`python -m benchmarks.sampling` prints `ratio sample_kv_cache_speedup <x>` and
`ratio caption_kv_cache_speedup <x>`.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from benchmarks.flops import SHAPES, build
from xfusion.sample import generate_captions, generate_images

STEPS, BATCH, PROMPT_TOKENS, CAPTION_TOKENS = 50, 32, 40, 48


def best_of(fn, repeats: int = 2) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    torch.manual_seed(0)
    shape, latent, _ = SHAPES["tiny"]
    model = build("dual_tower", shape, latent[0], "cpu").eval()
    with torch.no_grad():  # a non-zero output layer, so generation does real work
        model.image_io.unpatch.weight.normal_(std=0.02)
    prompts = [list(range(5, 5 + PROMPT_TOKENS))] * BATCH
    noise = torch.randn(BATCH, *latent)
    t2i = {kv: best_of(lambda: generate_images(model, prompts, STEPS, 5.5, noise=noise,
                                               kv_cache=kv)) for kv in (False, True)}
    print(f"ratio sample_kv_cache_speedup {t2i[False] / t2i[True]:.2f}", flush=True)
    model.ids = dataclasses.replace(model.ids, eos=-1)  # no eos: decode the full length
    latents = torch.randn(BATCH, *latent)
    i2t = {kv: best_of(lambda: generate_captions(model, latents, CAPTION_TOKENS, kv_cache=kv))
           for kv in (False, True)}
    print(f"ratio caption_kv_cache_speedup {i2t[False] / i2t[True]:.2f}", flush=True)


if __name__ == "__main__":
    main()
