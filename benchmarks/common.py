"""Shared pieces of the benchmarks: the result-line format, interleaved timing, the matmul ceiling
and tensor-memory measurement.

Result lines (what benchmarks/run.py collects): `ratio <name> <value>`, `count <name> <value>` or
`value <name> <value>`; notes start with `# `. Ratios are measured within one process with the
variants interleaved round by round, so a machine's changing load slows both sides alike.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, NamedTuple

import torch

KINDS = ("ratio", "count", "value")


class ResultLine(NamedTuple):
    kind: str  # ratio | count | value
    name: str
    value: float


def parse_line(line: str) -> ResultLine | None:
    """`ratio flops.tiny.dual_tower/single_tower 0.997` -> ResultLine; anything else -> None."""
    parts = line.split()
    if len(parts) != 3 or parts[0] not in KINDS:
        return None
    try:
        return ResultLine(parts[0], parts[1], float(parts[2]))
    except ValueError:
        return None


def parse_lines(text: str) -> list[ResultLine]:
    return [r for r in map(parse_line, text.splitlines()) if r is not None]


def emit(kind: str, name: str, value: float, digits: int = 3) -> None:
    if kind not in KINDS or " " in name:
        raise ValueError(f"result line {kind!r} {name!r}: kind must be one of {KINDS}, no spaces")
    print(f"{kind} {name} {value:.{digits}f}", flush=True)


def note(text: str) -> None:
    print(f"# {text}", flush=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, device: torch.device,
                warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each fn: `warmup` untimed rounds, then `rounds` timed rounds in which
    every fn runs once (the order rotating, so none always runs after the same neighbour)."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            synchronize(device)
            start = time.perf_counter()
            fns[name]()
            synchronize(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def matmul_flops_per_s(device: torch.device, dtype: torch.dtype, n: int = 2048,
                       repeats: int = 3) -> float:
    """The best FLOP/s of an (n, n) @ (n, n) torch.mm over `repeats` calls: the ceiling a model's
    matmuls could reach on this device, dtype and thread count."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):  # the first call warms the kernel up
        synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def peak_allocated_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes of tensors allocated by `fn` above what was live when it started.

    CUDA: torch.cuda.max_memory_allocated. CPU: the allocator's own alloc/free events, recorded
    by torch.profiler(profile_memory=True) (every tensor allocation and free, in order); their
    running sum is the live tensor memory and its maximum the peak. Python objects and the
    allocator's cached-but-free blocks are not tensors and are not counted."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
              and e.device_type() == torch.autograd.DeviceType.CPU]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak
