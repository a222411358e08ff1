"""Training step time of the dual tower against single_tower and the naive dual tower, model FLOPs
utilisation, and peak tensor memory of a step.

One training step = compute_loss (forward) + backward + AdamW step, on one mixed batch (2/3 T2I,
1/3 I2T, the recipe's t2i_ratio), float32 on the CPU and bf16 weights on a GPU. Untrained
weights (speed only). Shapes:
  tiny    config/tiny.yaml's Llama (hidden 128, 4 layers), 16 image + 40 caption tokens, 24 samples
  medium  hidden 512, 8 layers, 169 image + 80 caption tokens (~250 tokens, 2/3 image), 2 samples
  llama-3.2-1b (GPU only)  hidden 2048, 16 layers, 256 image + 77 caption tokens, 16 samples
Variants are timed interleaved, round by round, in one process (benchmarks.common.interleaved) and
compared by their medians, so the machine's load affects both sides of a ratio alike.

MFU: FLOPs of one dual_tower step (FlopCounterMode over forward + backward: the work the model
really asks for, frozen weights' gradients excluded) / its median step time, divided by the best
FLOP/s of a large square torch.mm (1024 on the CPU, 8192 on a GPU) measured in the same process,
dtype and thread count (between the timing rounds, under the same load).

Threads: torch's default, except on a CPU whose load average exceeds its cores, where OpenMP's
barriers stall whenever one of its threads is descheduled (a tiny step measured 10x slower with
2 threads than with 1 on a 2-core machine at load 10): there it runs 1 thread and says so.
`--threads N` sets it explicitly. On a GPU the 1B step is also put against the H100's dense
bf16 peak (989 TFLOP/s).

Peak memory: parameters (frozen ones included) + AdamW states + the peak of tensor allocations
during a step (activations, gradients): torch.cuda.max_memory_allocated on a GPU; on the CPU the
allocator's alloc/free events recorded by torch.profiler(profile_memory=True) (see
benchmarks.common.peak_allocated_bytes), measured on the second step, when AdamW's states exist.

Why the naive dual tower costs less than 2x single_tower per *training* step although its forward
is 2x: single_tower trains every Llama weight (backward = input and weight gradients, ~2x the
forward), while the naive dual tower's frozen text tower needs input gradients only; step FLOPs
come to ~(2 + 1 + 2) / (1 + 2) = 5/3. `step_flops.<shape>.<variant>/single_tower` (FlopCounterMode
over forward + backward) gives the exact expectation beside each measured time ratio.

`python -m benchmarks.step_time` prints `ratio step_time.<shape>.<variant>/single_tower <x>`,
`ratio step_time.<shape>.naive_dual_tower/dual_tower <x>`,
`ratio step_time.<shape>.x_fuse_dit/dual_tower <x>` and `step_flops.<shape>.x_fuse_dit/dual_tower`
(Sec. 7.2's DiT vision tower, benchmarks.flops.DIT_SHAPES),
`ratio step_flops.<shape>.<variant>/single_tower <x>`, `ratio mfu.cpu <x>` (or `mfu.cuda`),
`count peak_mem_mb.<variant> <MB>` (medium shape) and `# ` notes.
"""

from __future__ import annotations

import argparse
import os

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import (emit, interleaved, matmul_flops_per_s, median, note,
                               peak_allocated_bytes, tensor_bytes)
from benchmarks.flops import DIT_SHAPES
from benchmarks.flops import SHAPES as FLOPS_SHAPES
from benchmarks.flops import build
from xfusion.model import Sample, XFusionModel

VARIANTS = ("single_tower", "dual_tower", "naive_dual_tower", "x_fuse_dit")
H100_BF16_PEAK = 989e12  # dense bf16 FLOP/s of an H100 SXM (NVIDIA datasheet, no sparsity)
# name: (Llama shape, latents (C, h, w), caption tokens, samples per batch, timed rounds)
SHAPES = {
    "tiny": (*FLOPS_SHAPES["tiny"], 24, 15),
    "medium": (dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                    num_key_value_heads=4, intermediate_size=1376, vocab_size=2048),
               (16, 26, 26), 80, 2, 5),
}
GPU_SHAPES = {"llama-3.2-1b": (*FLOPS_SHAPES["llama-3.2-1b"], 16, 10)}
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")
ATTENTION_OPS = "aten::_scaled_dot_product_"  # the fused SDPA kernels, forward and backward


def mixed_batch(model: XFusionModel, latent: tuple, n_caption: int, n: int):
    """n samples, 2/3 T2I with t drawn uniformly, 1/3 clean I2T; full-length captions."""
    g = torch.Generator().manual_seed(0)
    caption = list(range(5, 5 + n_caption))
    samples = [Sample("i2t" if k % 3 == 2 else "t2i", caption,
                      torch.randn(latent, generator=g), 0.0 if k % 3 == 2 else
                      float(torch.rand((), generator=g))) for k in range(n)]
    return model.build_batch(samples, torch.Generator().manual_seed(1))


class Trainer:
    """One variant's model, batch and AdamW; `step()` is one training step."""

    def __init__(self, variant: str, shape: dict, latent: tuple, n_caption: int, n: int,
                 device: torch.device, dit: dict | None = None):
        torch.manual_seed(0)
        self.model = build(variant, shape, latent[0], str(device), dit).train()
        if device.type == "cuda":
            self.model.to(torch.bfloat16)  # bf16 weights, as the engine's bf16 mode
        t = self.model.cfg.training
        self.opt = torch.optim.AdamW(self.model.param_groups(t.lr), betas=t.betas, eps=t.eps)
        self.batch = mixed_batch(self.model, latent, n_caption, n)

    def forward_backward(self) -> None:
        self.model.compute_loss(self.batch).loss.backward()

    def step(self) -> None:
        self.forward_backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def flops(self) -> int:
        with FlopCounterMode(display=False) as counter:
            self.forward_backward()
        self.opt.zero_grad(set_to_none=True)
        return counter.get_total_flops()

    def persistent_bytes(self) -> int:
        """Parameters (all) + optimizer states: what stays allocated between steps."""
        states = [v for s in self.opt.state.values() for v in s.values()
                  if isinstance(v, torch.Tensor)]
        return tensor_bytes(self.model.parameters()) + tensor_bytes(states)

    def tokens(self) -> int:
        return int(self.batch.valid.sum())


def matmul_share(trainer: Trainer) -> float:
    """Share of a step's CPU time spent inside matmul / attention kernels (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer.step()
    stats = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in stats)
    matmul = sum(e.self_cpu_time_total for e in stats
                 if e.key in MATMUL_OPS or e.key.startswith(ATTENTION_OPS))
    return matmul / max(total, 1e-9)


def time_shape(name: str, spec: tuple, device: torch.device, dtype: torch.dtype):
    """Ratio lines of one shape; returns the trainers and the medians (s) and mm ceiling."""
    shape, latent, n_caption, n, rounds = spec
    trainers = {v: Trainer(v, shape, latent, n_caption, n, device, DIT_SHAPES.get(name))
                for v in VARIANTS}
    ceilings: list[float] = []
    fns = {v: tr.step for v, tr in trainers.items()}
    n_mm = 8192 if device.type == "cuda" else 1024
    fns["matmul_ceiling"] = lambda: ceilings.append(matmul_flops_per_s(device, dtype, n_mm))
    times = interleaved(fns, rounds, device)
    med = {v: median(times[v]) for v in VARIANTS}
    for v in ("dual_tower", "naive_dual_tower"):
        emit("ratio", f"step_time.{name}.{v}/single_tower", med[v] / med["single_tower"])
    for v in ("naive_dual_tower", "x_fuse_dit"):
        emit("ratio", f"step_time.{name}.{v}/dual_tower", med[v] / med["dual_tower"])
    flops = {v: tr.flops() for v, tr in trainers.items()}
    for v in ("dual_tower", "naive_dual_tower"):
        emit("ratio", f"step_flops.{name}.{v}/single_tower", flops[v] / flops["single_tower"])
    emit("ratio", f"step_flops.{name}.x_fuse_dit/dual_tower",
         flops["x_fuse_dit"] / flops["dual_tower"])
    note(f"step_time.{name}: {trainers['dual_tower'].tokens()} tokens/step, median of {rounds} "
         f"interleaved rounds, seconds: " + ", ".join(f"{v} {med[v]:.4f}" for v in VARIANTS))
    return trainers, med, median(ceilings[1:] or ceilings)  # round 0 is the warm-up


def report_mfu(label: str, trainer: Trainer, step_s: float, ceiling: float,
               peak: float | None = None) -> int:
    flops = trainer.flops()
    achieved = flops / step_s
    emit("ratio", f"mfu.{label}", achieved / ceiling)
    note(f"mfu.{label}: dual_tower step = {flops / 1e9:.2f} GFLOP (FlopCounterMode, fwd+bwd) in "
         f"{step_s:.4f} s = {achieved / 1e9:.1f} GFLOP/s; matmul ceiling (square mm, "
         f"{torch.get_num_threads()} threads) {ceiling / 1e9:.1f} GFLOP/s")
    if peak is not None:
        emit("ratio", f"mfu.{label}.vs_peak", achieved / peak)
        note(f"mfu.{label}.vs_peak: against {peak / 1e12:.0f} TFLOP/s (H100 SXM dense bf16) on "
             f"{torch.cuda.get_device_name()}")
        emit("value", f"tokens_per_s.{label}", trainer.tokens() / step_s, digits=0)
    return flops


def report_memory(trainers: dict[str, Trainer], device: torch.device, shape: str) -> None:
    for v, tr in trainers.items():  # every trainer has stepped: its AdamW states exist
        peak = tr.persistent_bytes() + peak_allocated_bytes(tr.step, device)
        emit("count", f"peak_mem_mb.{v}", peak / 2**20, digits=1)
    note(f"peak_mem_mb: {shape} shape; parameters (frozen included) + AdamW states + peak tensor "
         "allocations of one step (" + ("torch.cuda.max_memory_allocated" if device.type == "cuda"
                                        else "CPU allocator events via torch.profiler") + ")")


def set_threads(requested: int | None, device: torch.device) -> None:
    cores = os.cpu_count() or 1
    if requested is None and device.type == "cpu" and os.getloadavg()[0] > cores:
        requested = 1
        note(f"load average {os.getloadavg()[0]:.1f} > {cores} cores: 1 thread (see docstring)")
    if requested is not None:
        torch.set_num_threads(requested)
    note(f"threads: {torch.get_num_threads()}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: see above)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    set_threads(args.threads, device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    results = {name: time_shape(name, spec, device, dtype) for name, spec in SHAPES.items()}
    trainers, med, ceiling = results["medium"]
    flops = report_mfu(device.type, trainers["dual_tower"], med["dual_tower"], ceiling)
    if device.type == "cpu":
        share = matmul_share(trainers["dual_tower"])
        in_mm = flops / (share * med["dual_tower"]) / ceiling
        note(f"mfu.cpu is limited by: {share:.0%} of a medium dual_tower step runs in matmul / "
             f"attention kernels, and there at ~{in_mm:.0%} of the ceiling (the small, skinny "
             "shapes of a 512-wide model); per-token routing gathers and scatters, RMSNorm, SiLU, "
             "softmax masks, AdamW's per-parameter loop and Python dispatch take the rest")
    report_memory(trainers, device, "medium")
    for name, spec in (GPU_SHAPES.items() if device.type == "cuda" else ()):
        trainers, med, ceiling = time_shape(name, spec, device, dtype)
        report_mfu(f"cuda.{name}", trainers["dual_tower"], med["dual_tower"], ceiling,
                   peak=H100_BF16_PEAK)
        del trainers


if __name__ == "__main__":
    main()
