"""The training loop of the pipeline's small supervised image models: Adam on the summed
cross-entropies of per-slot class heads, batches drawn with replacement from a seeded generator.
Its users: eval.attribute_classifier (slots = position cells; an evaluator) and
xfusion.align_encoder (slots = patches; REPA's tiny target) — one loop, separate models, data
and objectives.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from tqdm import tqdm


def fit_heads(forward: Callable[[torch.Tensor], list[torch.Tensor]],
              params: Iterable[torch.nn.Parameter], pixels: torch.Tensor, targets: torch.Tensor,
              steps: int, batch_size: int, lr: float, generator: torch.Generator, desc: str,
              augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None
              ) -> list[float]:
    """`steps` Adam updates; returns the losses.

    forward: pixels (B, 3, H, W) -> per attribute (B, slots, classes) logits.
    targets: (N, slots, attributes) class indices of `pixels` (N, 3, H, W).
    augment: (batch, generator) -> batch, drawn after the batch indices (None: none).
    The models' train/eval modes are the caller's."""
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    for _ in tqdm(range(steps), desc=desc, unit="step"):
        b = torch.randint(len(pixels), (min(batch_size, len(pixels)),), generator=generator)
        x = pixels[b] if augment is None else augment(pixels[b], generator)
        loss = sum(F.cross_entropy(logits.flatten(0, 1), targets[b][..., k].flatten())
                   for k, logits in enumerate(forward(x)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses
