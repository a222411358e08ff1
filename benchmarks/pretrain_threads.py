"""A tiny base-LM pretraining step (config/tiny.yaml's base LM, batch 16 x 256 tokens, through
the DeepSpeed engine under `pin_numerics`, as `xfusion.pretrain_lm` runs it) on one intra-op
thread against two: why the base_lm rule takes `threads: 2` (`PRETRAIN_THREADS`).

The two thread counts are timed interleaved (benchmarks.common.interleaved) in one process on
one model each, so a changing load slows both alike. On a machine with one core the ratio is
about 1 (the second thread has nowhere to run), which is what that machine pays.

`python -m benchmarks.pretrain_threads` prints `ratio pretrain_threads.step.1/2 <x>`.
"""

from __future__ import annotations

import torch

from benchmarks.common import emit, interleaved, median, note
from benchmarks.zero_buckets import pretrain_step
from xfusion.pretrain_lm import pin_numerics

ROUNDS = 6


def on_threads(step, threads: int):
    """`step` run under the pretraining's pinned numerics with `threads` intra-op threads."""
    def run():
        with pin_numerics(threads=threads):
            step()
    return run


def main() -> None:
    fns = {"1": on_threads(pretrain_step(False), 1), "2": on_threads(pretrain_step(False), 2)}
    times = interleaved(fns, ROUNDS, torch.device("cpu"))
    note(f"pretraining step, median of {ROUNDS}: one thread {median(times['1']):.3f} s, "
         f"two {median(times['2']):.3f} s")
    emit("ratio", "pretrain_threads.step.1/2", median(times["1"]) / median(times["2"]))


if __name__ == "__main__":
    main()
