"""The training engine: DeepSpeed ZeRO applied to a model from outside (torchtitan's habit).

The only module that imports DeepSpeed. The same path runs everywhere so that tests exercise what
users run: on a GPU, NCCL + bf16 (when `training.precision: bf16`); on a CPU, DeepSpeed's CPU
accelerator (`DS_ACCELERATOR=cpu`) over gloo with fp32. The first CPU run compiles a small shared
memory comm op (cached under ~/.cache/torch_extensions), later runs start in a few seconds.

The optimizer is a plain `torch.optim.AdamW` handed to DeepSpeed (hence
`zero_allow_untested_optimizer`), with a linear warm-up then constant or cosine-decayed LR.
Gradient accumulation and checkpoints are DeepSpeed's own (`gradient_accumulation_steps`,
`save_checkpoint`/`load_checkpoint`); its files are read with `torch.load(weights_only=True)` and
an allowlist of three DeepSpeed data classes instead of its default `weights_only=False`.

References: DeepSpeed ZeRO (Rajbhandari et al., 2020); torchtitan's train spec; X-Fusion Sec. 4
(AdamW, beta = (0.9, 0.95), linear warm-up).
"""

from __future__ import annotations

import math
import os
import re
import socket
import sys
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from xfusion.config import TrainingConfig

LR_DECAYS = ("none", "cosine")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- rank discovery -------------------------------------------------------------------------------
# Slurm's pseudo step ids (slurm.h: SLURM_PENDING_STEP 0xfffffffd, SLURM_BATCH_SCRIPT 0xfffffffb,
# SLURM_EXTERN_CONT 0xfffffffc, SLURM_INTERACTIVE_STEP 0xfffffffa): no srun task launch.
_SLURM_PSEUDO_STEP = 0xFFFFFFF0
SLURM_PORT_BASE, SLURM_PORT_SPAN = 15000, 20000


@dataclass(frozen=True)
class RankInfo:
    """Where this process sits in the job: what `discover_ranks` found, and where.

    `source` is "torchrun" (RANK/WORLD_SIZE set by torchrun, the deepspeed launcher or by
    hand), "slurm" (an `srun` task: SLURM_PROCID and the step's task count) or "single" (one
    process, nothing set)."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compressed host list -> host names: `gpu[01-04,07]`, `a[1-2],b3`, `node-[009-011]`
    (zero padding kept, as `scontrol show hostnames` does)."""
    hosts: list[str] = []
    for item in re.findall(r"[^,\[]+(?:\[[^\]]*\][^,\[]*)*", nodelist.replace(" ", "")):
        expanded = [""]
        for literal, ranges in re.findall(r"([^\[]*)(?:\[([^\]]*)\])?", item):
            choices = [literal]
            if ranges:
                choices = []
                for part in ranges.split(","):
                    lo, _, hi = part.partition("-")
                    if not lo.isdigit() or (hi and not hi.isdigit()):
                        raise ValueError(f"SLURM node list {nodelist!r}: bad range {part!r}")
                    width = len(lo)
                    choices += [literal + str(n).zfill(width)
                                for n in range(int(lo), int(hi or lo) + 1)]
            expanded = [e + c for e in expanded for c in choices]
        hosts += [h for h in expanded if h]
    if not hosts:
        raise ValueError(f"SLURM node list {nodelist!r}: no host")
    return hosts


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise ValueError(f"{key} = {env[key]!r}: not an integer") from None


def _slurm_step_tasks(env: Mapping[str, str]) -> int | None:
    """Tasks of the srun step this process belongs to, or None outside one. srun sets
    SLURM_STEP_ID and SLURM_STEP_NUM_TASKS for its tasks; a batch script (sbatch, also a
    Snakemake job's) or an salloc shell has no step id (or a pseudo one) even when the
    allocation has SLURM_NTASKS > 1: there a plain `python -m …` is one process."""
    if "SLURM_PROCID" not in env or "SLURM_STEP_ID" not in env:
        return None
    if _int(env, "SLURM_STEP_ID") >= _SLURM_PSEUDO_STEP:
        return None
    key = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
    return _int(env, key) if key in env else None


def _slurm_port(env: Mapping[str, str]) -> int | None:
    """A port every task of the job derives alike (no free-port search: ranks cannot agree)."""
    if "SLURM_JOB_ID" not in env:
        return None
    return SLURM_PORT_BASE + _int(env, "SLURM_JOB_ID") % SLURM_PORT_SPAN


def _slurm_master(env: Mapping[str, str]) -> str | None:
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    return expand_nodelist(nodelist)[0] if nodelist else None


def discover_ranks(env: Mapping[str, str], free_port: Callable[[], int] | None = None
                   ) -> RankInfo:
    """Rank, world size and rendezvous of this process, from launcher variables (pure).

    1. torchrun / the deepspeed launcher (RANK, WORLD_SIZE set; LOCAL_RANK, MASTER_ADDR,
       MASTER_PORT as set). Inside an srun step, WORLD_SIZE must equal the step's tasks times
       LOCAL_WORLD_SIZE (1 task per rank, or one torchrun per node): anything else is an error.
    2. An srun task (SLURM_PROCID + a real SLURM_STEP_ID): rank SLURM_PROCID, world
       SLURM_STEP_NUM_TASKS (else SLURM_NTASKS), local rank SLURM_LOCALID, master the first host
       of SLURM_STEP_NODELIST (else SLURM_JOB_NODELIST), port MASTER_PORT or
       15000 + SLURM_JOB_ID % 20000 (the same on every task).
    3. Otherwise one process: rank 0 of 1 on 127.0.0.1, MASTER_PORT or a free port. A batch
       script inside an allocation of several tasks is this case: launch with srun for more.
    A multi-rank job without a port all ranks can agree on, or a rank outside [0, world), is an
    error, never a silent fallback.
    """
    step_tasks = _slurm_step_tasks(env)
    if "RANK" in env or "WORLD_SIZE" in env:
        missing = [k for k in ("RANK", "WORLD_SIZE") if k not in env]
        if missing:
            raise ValueError(f"{' and '.join(missing)} not set beside "
                             f"{'WORLD_SIZE' if 'RANK' in env else 'RANK'}: a launcher sets both")
        source, rank, world = "torchrun", _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local_rank = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0
        per_task = _int(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else 1
        if step_tasks is not None and world != step_tasks * per_task:
            raise ValueError(
                f"WORLD_SIZE = {world} but this srun step has {step_tasks} tasks "
                f"(SLURM_STEP_NUM_TASKS/SLURM_NTASKS) x LOCAL_WORLD_SIZE {per_task} = "
                f"{step_tasks * per_task} processes: launch one rank per task (srun -n "
                f"{world}) or one torchrun per task, not both")
    elif step_tasks is not None:
        source, rank, world = "slurm", _int(env, "SLURM_PROCID"), step_tasks
        local_rank = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
    else:
        source, rank, world, local_rank = "single", 0, 1, 0
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside the world of {world} processes ({source} "
                         "variables): check the launcher")
    addr = env.get("MASTER_ADDR") or (_slurm_master(env) if source != "single" else None)
    if addr is None:
        if world > 1:
            raise ValueError(f"{world} ranks but no MASTER_ADDR (nor a SLURM node list): set "
                             "MASTER_ADDR to rank 0's host")
        addr = "127.0.0.1"
    if "MASTER_PORT" in env:
        port = _int(env, "MASTER_PORT")
    elif (port := _slurm_port(env) if source != "single" else None) is None:
        if world > 1:
            raise ValueError(f"{world} ranks but no MASTER_PORT and no SLURM_JOB_ID to derive "
                             "one from: set MASTER_PORT, the same on every rank")
        port = (free_port or _free_port)()
    return RankInfo(rank, world, local_rank, addr, port, source)


_RANK_INFO: RankInfo | None = None  # what this process was initialised with


def _export(info: RankInfo) -> None:
    os.environ.update(RANK=str(info.rank), WORLD_SIZE=str(info.world_size),
                      LOCAL_RANK=str(info.local_rank), MASTER_ADDR=info.master_addr,
                      MASTER_PORT=str(info.master_port))


def setup_distributed() -> None:
    """Initialise torch.distributed through DeepSpeed, once per process.

    `discover_ranks` reads the launcher's variables (torchrun/deepspeed's RANK, WORLD_SIZE, …;
    else an srun task's SLURM_PROCID, SLURM_STEP_NUM_TASKS, …; else one process on a free port,
    so parallel jobs on one host never collide) and exports them as the RANK/WORLD_SIZE/
    LOCAL_RANK/MASTER_ADDR/MASTER_PORT that torch.distributed reads. Every rank logs what it found
    once, on stderr. DS_ACCELERATOR must be set before DeepSpeed is imported, hence the late import.
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    global _RANK_INFO
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if _RANK_INFO is not None:  # DeepSpeed reads LOCAL_RANK & co. again per engine
            _export(_RANK_INFO)
        return
    info = _RANK_INFO = discover_ranks(os.environ)
    _export(info)
    print(f"xfusion.engine: rank {info.rank} of {info.world_size} (local rank {info.local_rank}, "
          f"{info.source}), rendezvous {info.master_addr}:{info.master_port}", file=sys.stderr,
          flush=True)
    import deepspeed

    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank)
    deepspeed.init_distributed("nccl" if torch.cuda.is_available() else "gloo")


def shutdown_distributed() -> None:
    """Tear the process group down, all ranks together, before the process exits. A rank that
    exits with gloo's threads still live can abort at exit ("terminate called without an active
    exception", return code -6, seen in the 2-rank tests after a run that had finished)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def lr_factor(step: int, warmup_steps: int, total_steps: int, decay: str = "none") -> float:
    """LR multiplier for optimizer step `step` (0-based): linear warm-up from 1/warmup to 1, then
    constant (the paper's recipe) or a cosine decay to 0 at `total_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "none":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class _LRSchedule:
    """The LambdaLR factor as a callable object, not a lambda: LambdaLR's state_dict then holds
    its attributes (primitives), so the schedule is checkpointed with weights_only-safe data."""

    def __init__(self, warmup_steps: int, total_steps: int, decay: str):
        self.warmup_steps, self.total_steps, self.decay = warmup_steps, total_steps, decay

    def __call__(self, step: int) -> float:
        return lr_factor(step, self.warmup_steps, self.total_steps, self.decay)


# DeepSpeed's default ZeRO bucket sizes (elements), sized for billion-parameter models on GPUs.
DS_BUCKET_ELEMENTS = 500_000_000


def bucket_elements(trainable_numel: int | None) -> int:
    """ZeRO's reduce/all-gather bucket: DeepSpeed's default, but never larger than the gradients
    it holds. ZeRO-2 allocates a fresh bucket of this many elements at every backward
    (stage_1_and_2.setup_buckets): 5e8 fp32 elements are 2 GB of new pages per step, which
    took 2/3 of a tiny pretraining step on the CPU (py-spy, README "How long it takes"). A bucket
    at least as large as all trainable gradients reduces them in one call, as the default does
    for every model smaller than 5e8 trainable parameters, so the arithmetic is unchanged."""
    if trainable_numel is None:
        return DS_BUCKET_ELEMENTS
    # A multiple of 512: ZeRO requires the all-gather bucket to be one of its alignment factor.
    return int(min(DS_BUCKET_ELEMENTS, -(-max(trainable_numel, 1) // 512) * 512))


def deepspeed_config(training: TrainingConfig, micro_batch_size: int,
                     gradient_accumulation_steps: int = 1, world: int = 1,
                     trainable_numel: int | None = None) -> dict[str, Any]:
    """The DeepSpeed JSON config, generated from our TrainingConfig (nothing set by hand);
    `trainable_numel` sizes the ZeRO buckets (`bucket_elements`)."""
    bucket = bucket_elements(trainable_numel)
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "train_batch_size": micro_batch_size * gradient_accumulation_steps * world,
        "gradient_clipping": training.grad_clip,
        "zero_optimization": {"stage": training.zero_stage, "reduce_bucket_size": bucket,
                              "allgather_bucket_size": bucket},
        # A plain torch AdamW: DeepSpeed's fused/CPU Adam kernels are not needed at our sizes and
        # would need compiling; ZeRO shards the plain optimizer's state just the same.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    if training.precision == "bf16":
        config["bf16"] = {"enabled": True}
    return config


CHECKPOINT_TAG = "deepspeed"  # DeepSpeed's files go to <dir>/deepspeed/


def _deepspeed_safe_globals() -> list:
    """The only non-tensor classes DeepSpeed 0.19's ZeRO optimizer files pickle (measured with
    torch.serialization.get_unsafe_globals_in_checkpoint, fp32 and bf16): plain data classes
    whose unpickling runs no code of the file's choosing."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def _weights_only_checkpoint_engine():
    """DeepSpeed's torch checkpoint engine, loading with weights_only=True. DeepSpeed 0.19.8's
    TorchCheckpointEngine.load calls torch.load(weights_only=False) (any pickled code would
    run); this one admits tensors, primitives and the three classes above, nothing else."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(_deepspeed_safe_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)

    return WeightsOnlyCheckpointEngine()


class Engine:
    """Optimizer, LR schedule, gradient clipping, accumulation and ZeRO sharding around a model.

    Args:
        model (nn.Module): the model; only parameters in `param_groups` are trained.
        param_groups (list[dict]): AdamW groups (`params`, `lr`), e.g. `XFusionModel.param_groups`.
        training (TrainingConfig): betas, eps, weight decay, clipping, warm-up, steps, precision,
            ZeRO stage.
        micro_batch_size (int): samples per micro-batch per rank (DeepSpeed checks it).
        lr_decay (str): "none" (warm-up then constant, the paper) or "cosine" (decay to 0 at
            `training.steps`).
        gradient_accumulation_steps (int): micro-batches per optimizer step (DeepSpeed's own).

    Verbs: `backward(loss)`, `step()` once per micro-batch (DeepSpeed divides the loss by the
    accumulation steps, averages gradients over ranks and updates only at the boundary); read
    `lr`, `grad_norm`, `global_step`; persist with `save(dir)` / `load(dir)`: DeepSpeed's own
    checkpoint (every rank its ZeRO shard; frozen parameters are never written), loaded with
    weights_only=True.
    """

    def __init__(self, model: torch.nn.Module, param_groups: list[dict], training: TrainingConfig,
                 micro_batch_size: int, lr_decay: str = "none",
                 gradient_accumulation_steps: int = 1):
        if lr_decay not in LR_DECAYS:
            raise ValueError(f"lr_decay = {lr_decay!r}: must be one of {', '.join(LR_DECAYS)}")
        if not any(p.requires_grad for g in param_groups for p in g["params"]):
            raise ValueError("Engine: param_groups hold no trainable parameter")
        setup_distributed()
        import deepspeed

        optimizer = torch.optim.AdamW(param_groups, betas=tuple(training.betas), eps=training.eps,
                                      weight_decay=training.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, _LRSchedule(training.warmup_steps, training.steps, lr_decay))
        self._ds, self._optimizer, _, self._scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler,
            config=deepspeed_config(training, micro_batch_size, gradient_accumulation_steps,
                                    world_size(), trainable_numel=sum(
                                        p.numel() for g in param_groups for p in g["params"]
                                        if p.requires_grad)))
        self._ds.checkpoint_engine = _weights_only_checkpoint_engine()
        self.module = self._ds.module
        self.device = self._ds.device

    def backward(self, loss: torch.Tensor) -> None:
        self._ds.backward(loss)

    def step(self) -> None:
        """End a micro-batch; at the accumulation boundary clip, reduce, update the weights and
        advance the LR schedule."""
        self._ds.step()

    @property
    def at_boundary(self) -> bool:
        """Whether the next `step()` updates the weights (the last micro-batch of a step)."""
        return bool(self._ds.is_gradient_accumulation_boundary())

    @property
    def lr(self) -> float:
        """LR of the first param group (the image-side LR for single_tower's ratio groups)."""
        return float(self._ds.get_lr()[0])

    @property
    def grad_norm(self) -> float:
        """Global gradient norm of the last step, before clipping."""
        norm = self._ds.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    @property
    def global_step(self) -> int:
        return int(self._ds.global_steps)

    def save(self, directory: str | os.PathLike) -> None:
        """DeepSpeed's checkpoint into `directory/deepspeed/` (collective: every rank writes its
        ZeRO shard, rank 0 the trainable module weights, LR schedule and step counters)."""
        self._ds.save_checkpoint(str(directory), tag=CHECKPOINT_TAG, client_state={},
                                 save_latest=False, exclude_frozen_parameters=True)

    def load(self, directory: str | os.PathLike) -> None:
        """Restore `save(directory)`: trainable weights, this rank's optimizer shard with its fp32
        master weights (bf16 resumes without precision loss), LR schedule, step counters. Frozen
        weights stay those of the base model (load_module_strict=False). ZeRO checkpoints are
        rigid: the world size must be the one that saved (checked by xfusion.checkpoint)."""
        path, _ = self._ds.load_checkpoint(str(directory), tag=CHECKPOINT_TAG,
                                           load_module_strict=False, load_optimizer_states=True,
                                           load_lr_scheduler_states=True)
        if path is None:
            raise FileNotFoundError(f"{directory}/{CHECKPOINT_TAG}: no DeepSpeed checkpoint")
