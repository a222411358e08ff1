"""The shard plan of the sharded data stage: which records of a split form shard k.

Captioning and latent encoding run as one job per shard (rules `caption` and `latents`,
workflow/rules/data.smk), each its own SLURM GPU job at paper scale, gathered into the split's
file by `python -m xfusion.gather` (rules `caption_gather`, `latents_gather`). The plan is
computed from the config while Snakemake parses, before any job (a manifest, not a Snakemake
checkpoint, so a dry run lists every shard job; docs/INTERFACES.md): split `s` has
`n_shards(n_s, data.captioner.shard_size)` shards, `n_s` = `data.n_train` or `data.n_heldout`,
and shard k holds the records on lines `shard_lines(k, size)` of `R/world/<s>/scenes.jsonl`.
The world generator writes exactly `n_s` records and the folder reader at most `n_s` (fewer when
the folder holds fewer images): a shard past the last record is empty, writes empty outputs and
loads no model, and the gather passes it over.

Pure Python (no torch): common.smk imports it at every parse.
"""

from __future__ import annotations

import math
from pathlib import Path


def n_shards(n_images: int, shard_size: int) -> int:
    """Shards of a split of at most `n_images` images, `shard_size` each (the last may be short)."""
    if n_images < 1 or shard_size < 1:
        raise ValueError(f"n_images = {n_images}, shard_size = {shard_size}: both must be >= 1")
    return math.ceil(n_images / shard_size)


def shard_name(k: int) -> str:
    """The file stem of shard k: six digits, so names sort in shard order."""
    return f"{k:06d}"


def shard_lines(k: int, shard_size: int) -> range:
    """The 1-based lines of a split's scenes file that shard k holds."""
    return range(k * shard_size + 1, (k + 1) * shard_size + 1)


def count_records(path: str | Path) -> int:
    """Non-blank lines of a jsonl file (its records, bad ones included)."""
    with open(path, "rb") as fh:
        return sum(1 for raw in fh if raw.strip())
