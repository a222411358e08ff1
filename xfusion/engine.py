"""The training engine: DeepSpeed ZeRO applied to a model from outside (torchtitan's habit).

The only module that imports DeepSpeed. The same path runs everywhere so that tests exercise what
users run: on a GPU, NCCL + bf16 (when `training.precision: bf16`); on a CPU, DeepSpeed's CPU
accelerator (`DS_ACCELERATOR=cpu`) over gloo with fp32. The first CPU run compiles a small shared
memory comm op (cached under ~/.cache/torch_extensions), later runs start in a few seconds.

The optimizer is a plain `torch.optim.AdamW` handed to DeepSpeed (hence
`zero_allow_untested_optimizer`), with a linear warm-up then constant or cosine-decayed LR.
`Engine.state_dict()` holds tensors and primitives only, so a checkpoint loads with
`torch.load(weights_only=True)`.

References: DeepSpeed ZeRO (Rajbhandari et al., 2020); torchtitan's train spec; X-Fusion Sec. 4
(AdamW, beta = (0.9, 0.95), linear warm-up).
"""

from __future__ import annotations

import math
import os
import socket
from typing import Any

import torch

from xfusion.config import TrainingConfig

LR_DECAYS = ("none", "cosine")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed() -> None:
    """Initialise torch.distributed through DeepSpeed, once per process.

    Under SLURM/torchrun the launcher sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT; a plain
    `python -m …` gets single-process defaults (a free port, so parallel jobs on one host never
    collide). DS_ACCELERATOR must be set before DeepSpeed is imported, hence the late import.
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    defaults = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    import deepspeed

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    deepspeed.init_distributed("nccl" if torch.cuda.is_available() else "gloo")


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


def deepspeed_config(training: TrainingConfig, micro_batch_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON config, generated from our TrainingConfig (nothing set by hand)."""
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": training.grad_clip,
        "zero_optimization": {"stage": training.zero_stage},
        # A plain torch AdamW: DeepSpeed's fused/CPU Adam kernels are not needed at our sizes and
        # would need compiling; ZeRO shards the plain optimizer's state just the same.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    if training.precision == "bf16":
        config["bf16"] = {"enabled": True}
    return config


class Engine:
    """Optimizer, LR schedule, gradient clipping and ZeRO sharding around a model.

    Args:
        model (nn.Module): the model; only parameters in `param_groups` are trained.
        param_groups (list[dict]): AdamW groups (`params`, `lr`), e.g. `XFusionModel.param_groups`.
        training (TrainingConfig): betas, eps, weight decay, clipping, warm-up, steps, precision,
            ZeRO stage.
        micro_batch_size (int): samples per step per rank (DeepSpeed checks it, nothing more).
        lr_decay (str): "none" (warm-up then constant, the paper) or "cosine" (decay to 0 at
            `training.steps`).

    Verbs: `backward(loss)`, `step()`; read `lr`, `grad_norm`, `global_step`; persist with
    `state_dict()` / `load_state_dict()` (per rank: ZeRO shards optimizer state by rank).
    """

    def __init__(self, model: torch.nn.Module, param_groups: list[dict], training: TrainingConfig,
                 micro_batch_size: int, lr_decay: str = "none"):
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
            config=deepspeed_config(training, micro_batch_size))
        self.module = self._ds.module
        self.device = self._ds.device

    def backward(self, loss: torch.Tensor) -> None:
        self._ds.backward(loss)

    def step(self) -> None:
        """Clip, reduce, update the weights and advance the LR schedule."""
        self._ds.step()

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

    def state_dict(self) -> dict[str, Any]:
        """This rank's optimizer shard + fp32 master weights + scheduler, tensors and primitives
        only. DeepSpeed's own dict carries objects (loss scaler, enums, slice mappings) that
        `torch.load(weights_only=True)` refuses; they are rebuilt from the live engine on load."""
        opt = dict(self._optimizer.state_dict())
        if isinstance(self._optimizer, torch.optim.Optimizer):  # ZeRO stage 0, fp32
            return self._pack(opt)
        if "single_partition_of_fp32_groups" not in opt:
            raise NotImplementedError(f"Engine.state_dict: {type(self._optimizer).__name__} "
                                      "(precision/zero_stage combination) is not supported; use "
                                      "zero_stage 1 or 2")
        loss_scaler = opt.pop("loss_scaler", None)
        opt.pop("param_slice_mappings", None)  # universal-checkpoint bookkeeping, derived
        opt["zero_stage"] = int(opt["zero_stage"]) if "zero_stage" in opt else None
        opt["loss_scale"] = float(getattr(loss_scaler, "cur_scale", 1.0))
        return self._pack(opt)

    def _pack(self, optimizer_state: dict[str, Any]) -> dict[str, Any]:
        return {"optimizer": optimizer_state, "scheduler": self._scheduler.state_dict(),
                "global_steps": self.global_step, "global_samples": int(self._ds.global_samples),
                "world_size": world_size()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore this rank's `state_dict()`. Model weights must already be in place; the fp32
        master copy is taken from the checkpoint, so bf16 training resumes without precision loss.
        ZeRO checkpoints are rigid (not elastic): the world size must be the one that saved."""
        if state["world_size"] != world_size():
            raise ValueError(f"checkpoint was written by {state['world_size']} ranks, this run "
                             f"has {world_size()}: resume with the same number of processes")
        if isinstance(self._optimizer, torch.optim.Optimizer):
            self._optimizer.load_state_dict(state["optimizer"])
        else:
            self._load_zero_state(state["optimizer"])
        self._scheduler.load_state_dict(state["scheduler"])
        self._ds.global_steps = state["global_steps"]
        self._ds.global_samples = state["global_samples"]

    def _load_zero_state(self, optimizer_state: dict[str, Any]) -> None:
        from deepspeed.runtime.zero.config import ZeroStageEnum

        live = self._optimizer.state_dict()
        opt = dict(optimizer_state)
        live["loss_scaler"].cur_scale = opt.pop("loss_scale")
        opt["loss_scaler"] = live["loss_scaler"]
        opt["zero_stage"] = ZeroStageEnum(opt["zero_stage"])
        opt["param_slice_mappings"] = live["param_slice_mappings"]
        # A rigid ZeRO checkpoint reads only this rank's entry of the per-rank list.
        states: list[dict[str, Any] | None] = [None] * world_size()
        states[rank()] = opt
        self._optimizer.load_state_dict(states, load_optimizer_states=True,
                                        load_from_fp32_weights=True)
