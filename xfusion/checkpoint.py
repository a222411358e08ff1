"""Resume state: `checkpoints/step_<N>/`, written atomically, the newest found by `latest`.

A checkpoint directory holds
- `deepspeed/`: DeepSpeed's own checkpoint (`Engine.save`: `save_checkpoint` with
  `exclude_frozen_parameters=True`): per rank its ZeRO optimizer shard with the fp32 master
  weights, and rank 0's trainable module weights, LR schedule and step counters. It is read with
  `torch.load(weights_only=True)` and an allowlist of three DeepSpeed data classes
  (xfusion.engine), not DeepSpeed's default `weights_only=False`;
- `trainable.safetensors`: the trainable weights, for people and tools (ZeRO-2 keeps full weights
  on every rank; rank 0 writes them);
- `rank<r>.pt`: per rank, our RNG states (python, numpy, torch, cuda) and the data position.
  Tensors and primitives only, so it loads with `torch.load(weights_only=True)`;
- `meta.json`: variant, base-model hash, train recipe hash (xfusion.config.train_recipe), step,
  world size. A checkpoint of another variant, base model or recipe is refused: resuming it would
  silently train a different experiment (xfusion.train moves another recipe's files aside first).

Writes are atomic (`xfusion.io.atomic_dir`): every rank writes into a shared `.step_<N>.shards/`
directory (a shared filesystem under SLURM), then rank 0 assembles the final directory in a temp
dir and renames it. A kill at any moment leaves either no `step_<N>` or a complete one;
dot-prefixed leftovers are ignored by `latest` and removed by the next save.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from xfusion.io import atomic_dir, atomic_write_json
from xfusion.model.xfusion import trainable_state

_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointMismatch(RuntimeError):
    """The checkpoint belongs to another variant, base model or recipe."""


@dataclass
class Checkpoint:
    path: Path
    step: int
    meta: dict[str, Any]
    weights: dict[str, torch.Tensor]
    engine_dir: Path  # DeepSpeed's checkpoint (Engine.load)
    rng: dict[str, Any]  # this rank's
    data: dict[str, Any]  # this rank's data position


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _barrier() -> None:
    if _dist()[1] > 1:
        torch.distributed.barrier()


def rng_state() -> dict[str, Any]:
    """All RNG states as tensors and primitives (numpy's array becomes a tensor)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                       "has_gauss": has_gauss, "gauss": gauss},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_trainable_(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy `weights` into the model's trainable parameters in place (the engine's flat ZeRO
    buffers stay the same storage); names must match exactly."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if params.keys() != weights.keys():
        missing, extra = sorted(params.keys() - weights.keys()), sorted(weights.keys() - params)
        raise CheckpointMismatch(f"trainable weights differ from the model's: "
                                 f"missing {missing[:5]}, "
                                 f"unexpected {extra[:5]}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name])


def step_dirs(root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and d.is_dir() and (d / "meta.json").is_file():
            found.append((int(m.group(1)), d))
    return sorted(found)


def latest(root: str | Path, before: int | None = None) -> Path | None:
    """The newest complete checkpoint under `root` (of a step below `before`, if given), or None."""
    dirs = [d for step, d in step_dirs(root) if before is None or step < before]
    return dirs[-1] if dirs else None


def save(root: str | Path, step: int, *, model: torch.nn.Module,
         save_engine: Callable[[Path], None], data_state: dict[str, Any], meta: dict[str, Any],
         keep_last: int) -> Path:
    """Write `root/step_<step>/` atomically (collective: every rank calls it) and keep the
    newest `keep_last` checkpoints. `save_engine(dir)` writes the engine's files into `dir`
    (`Engine.save`: DeepSpeed's `dir/deepspeed/`), on every rank."""
    root = Path(root)
    rank, world = _dist()
    shards = root / f".step_{step}.shards"
    if rank == 0:
        shutil.rmtree(shards, ignore_errors=True)
        shards.mkdir(parents=True)
    _barrier()
    save_engine(shards)
    torch.save({"rng": rng_state(), "data": data_state}, shards / f"rank{rank}.pt")
    _barrier()
    final = root / f"step_{step}"
    if rank == 0:
        with atomic_dir(final) as tmp:
            for shard in shards.iterdir():
                shard.rename(tmp / shard.name)
            save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
            atomic_write_json(tmp / "meta.json", {**meta, "step": step, "world_size": world})
        shutil.rmtree(shards, ignore_errors=True)
        _prune(root, keep_last)
    _barrier()
    return final


def _prune(root: Path, keep_last: int) -> None:
    for _, d in step_dirs(root)[:-keep_last]:
        shutil.rmtree(d, ignore_errors=True)
    for d in root.glob(".step_*"):  # leftovers of killed saves
        shutil.rmtree(d, ignore_errors=True)


def check_meta(meta: dict[str, Any], expected: dict[str, Any], path: Path) -> None:
    """Refuse a checkpoint whose identity (variant, base-model hash, recipe, …) is not this run's."""
    for key, value in expected.items():
        if meta.get(key) != value:
            raise CheckpointMismatch(
                f"{path}: checkpoint has {key} = {meta.get(key)!r}, this run has {value!r}. "
                f"It belongs to another run: move {path.parent} aside or pass another --out")


def load(path: str | Path, expected: dict[str, Any]) -> Checkpoint:
    """Load a checkpoint written by `save`, after checking `expected` against its meta.json."""
    path = Path(path)
    meta = json.loads((path / "meta.json").read_text())
    check_meta(meta, expected, path)
    rank, world = _dist()
    if meta["world_size"] != world:
        raise CheckpointMismatch(f"{path}: written by {meta['world_size']} ranks, this run has "
                                 f"{world}; resume with the same number of processes")
    shard = torch.load(path / f"rank{rank}.pt", weights_only=True, map_location="cpu")
    return Checkpoint(path=path, step=int(meta["step"]), meta=meta,
                      weights=load_file(str(path / "trainable.safetensors")),
                      engine_dir=path, rng=shard["rng"], data=shard["data"])
