"""A tiny base-LM pretraining step through the DeepSpeed ZeRO-2 engine with DeepSpeed's default
bucket size (5e8 elements) against buckets sized to the trainable gradients
(`xfusion.engine.bucket_elements`).

ZeRO-2 allocates a fresh reduce bucket at every backward (stage_1_and_2.setup_buckets); at the
default size that is 2 GB of new fp32 pages per step, whatever the model's size, and under
deterministic algorithms (the pretraining's `pin_numerics`) torch fills every new tensor with NaN
(torch.utils.deterministic.fill_uninitialized_memory): 2 GB written per step. py-spy on a tiny
pretraining (config/tiny.yaml's base LM, batch 16 x 256 tokens, one thread) put 2/3 of its step
there (the fill kernel, page faults, setup_buckets). Both engines train the same weights bit for bit (tests/test_engine.py); only the
time differs. The two are timed interleaved (benchmarks.common.interleaved) in one process, as
the pretraining runs (pin_numerics: its pinned threads, deterministic algorithms), and once more
without deterministic algorithms, as X-Fusion training runs.

`python -m benchmarks.zero_buckets` prints `ratio zero_buckets.pretrain_step.default/sized <x>`
and `ratio zero_buckets.nondeterministic_step.default/sized <x>`.
"""

from __future__ import annotations

import dataclasses
import unittest.mock

import torch
import torch.nn.functional as F

from benchmarks.common import emit, interleaved, median, note
from xfusion import engine as engine_mod
from xfusion.config import load_run
from xfusion.model.base import build_tiny_llama
from xfusion.pretrain_lm import pin_numerics

ROUNDS = 6


def pretrain_step(default_buckets: bool):
    """A closure running one pretraining step (forward, backward, AdamW) of a fresh tiny Llama
    on a fixed random batch, with the given bucket sizing."""
    cfg = load_run("config/tiny.yaml")
    base = cfg.model.base_lm
    torch.manual_seed(0)
    llm = build_tiny_llama(base.tiny, cfg.data.tokenizer_vocab_size, 1, 2, 0)
    training = dataclasses.replace(cfg.training, steps=100, lr=base.pretrain_lr, warmup_steps=5)
    sizing = ((lambda numel: engine_mod.DS_BUCKET_ELEMENTS) if default_buckets
              else engine_mod.bucket_elements)
    with unittest.mock.patch.object(engine_mod, "bucket_elements", sizing):
        eng = engine_mod.Engine(llm, [{"params": list(llm.parameters()), "lr": base.pretrain_lr}],
                                training, micro_batch_size=base.pretrain_batch_size)
    ids = torch.randint(5, cfg.data.tokenizer_vocab_size,
                        (base.pretrain_batch_size, base.pretrain_seq_len))

    def step():
        logits = eng.module(input_ids=ids).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        eng.backward(loss)
        eng.step()

    return step


def measure(name: str) -> None:
    fns = {"default": pretrain_step(True), "sized": pretrain_step(False)}
    times = interleaved(fns, ROUNDS, torch.device("cpu"))
    note(f"{name}, median of {ROUNDS}: default buckets {median(times['default']):.3f} s, "
         f"sized {median(times['sized']):.3f} s")
    emit("ratio", f"zero_buckets.{name}.default/sized",
         median(times["default"]) / median(times["sized"]))


def main() -> None:
    with pin_numerics():  # as xfusion.pretrain_lm runs
        measure("pretrain_step")
    torch.set_num_threads(1)
    measure("nondeterministic_step")


if __name__ == "__main__":
    main()
