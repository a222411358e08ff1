"""The base LLM: pretrain the tiny Llama on the world corpus (tiny), or name a pretrained one.

`python -m xfusion.pretrain_lm --config C --run RUN --tokenizer R/tokenizer --corpus R/world/corpus.txt --mmlu R/world/mmlu --out R/base_lm/<name>`

Tiny scale (`model.base_lm.source: tiny`): next-token prediction on the corpus packed as one
token stream, windows of `pretrain_seq_len` tokens each led by BOS (most positions sit far from
it, so the harness's BOS-free prompts at evaluation are in distribution), AdamW through the same DeepSpeed engine as X-Fusion training, linear warm-up then
cosine decay. Checkpoints and automatic resume as in `xfusion.train`. Writes `hf/` (the
LlamaForCausalLM and its tokenizer, safetensors), `base_model.json` and `pretrain_mmlu.json`: the
tiny MMLU (5-shot, log-likelihood of " A".." D", xfusion.mmlu: the scorer eval.mmlu uses)
measured on the result. Nothing here checks that number: the frozen-text-tower comparisons only
mean something well above chance (25%), which the slow test of tests/test_pretrain_lm.py asserts
for the tiny recipe; read pretrain_mmlu.json (the log prints it too) after changing the recipe.

Reproducibility: floating-point sums are not associative, so a kernel's result depends on how it
splits a reduction over threads (the intra-op thread count: Snakemake's `threads` via
OMP_NUM_THREADS, else every core) and on the CPU kernels it dispatches to (AVX-512 vs AVX2); a
last-bit difference at step 1 grows into another model by step 1000. The pretraining therefore
runs on `PRETRAIN_THREADS` intra-op threads whatever the machine or environment says, with
deterministic algorithms, and `python -m` pins the x86 kernel family to AVX2 (`NUMERICS_ENV`:
ATen's dispatch, MKL's conditional numerical reproducibility). Same inputs -> bitwise-identical
weights on one machine whatever its core count (tested), and the same bits on AVX-512 and AVX2
Intel CPUs (emulated on one AVX-512 CPU by forcing each dispatch, not run on two machines). Not
across CPU vendors: MKL's AVX2 branch exists on Intel CPUs only, and on an AMD CPU MKL takes its
own (AUTO) branch, so the same recipe trains other weights there (measured: tiny_base MMLU 0.294
on an AMD EPYC machine, 0.381 in two clean clones of an earlier stop, its CPU not recorded;
README "Tiny base LLM"). MKL's COMPATIBLE branch (SSE2) would give one result on both vendors,
at 2.5x the step time (measured here, benchmarks.zero_buckets's step, under load).
ARM or GPU runs compute other bits. The world, captions and tokenizer are deterministic already:
tests/test_pretrain_lm.py runs the chain twice under different thread counts and hash seeds and
compares every artefact and the weights bitwise.

Paper scale (`source: pretrained`): nothing is trained; `base_model.json` names
`model.base_lm.path`. Its `text_weight_hash` is computed by loading the weights on the CPU (a few
GB for 1B-8B models, once per base model; every checkpoint then checks against it). The tokenizer
is `data.tokenizer_path` adapted by xfusion.tokenizer (`--tokenizer R/tokenizer`).

References: nanoGPT train.py (flat loop, packed token stream, cosine LR); lm-evaluation-harness
`mmlu` (prompt "{description}{question}\\nA. ..\\nAnswer:", choices " A".." D").
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from xfusion import checkpoint
from xfusion.config import RunConfig, load_run
from xfusion.engine import Engine, rank
from xfusion.io import atomic_dir, atomic_write_json
from xfusion.mmlu import causal_lm_loglik, evaluate_mmlu, load_mmlu
from xfusion.model.base import build_tiny_llama, load_base_llm, text_weight_hash
from xfusion.tokenizer import ANSWER_LETTERS, load_tokenizer



# Intra-op threads of the pretraining, whatever the machine or OMP_NUM_THREADS says: the thread
# count can change how reductions are split, hence the weights (see the module docstring). Two,
# as Snakemake gives the base_lm rule (workflow/rules/base.smk `threads: 2`): the base LM is the
# demo's critical path. config/tiny.yaml's 2000 steps took 982 s on two threads of an idle AMD
# EPYC, against about 33 min on one, and gave the one-thread run's weights bit for bit (MKL's
# STRICT mode; measured once, not promised on other CPUs). A one-core machine runs the same two
# threads, slower.
PRETRAIN_THREADS = 2
# x86 kernel families pinned for the process (set before the first kernel runs): ATen's CPU
# dispatch and MKL's code path (CNR mode), so AVX-512 and AVX2 Intel machines compute the same
# bits (an AMD CPU takes MKL's AUTO branch instead: the module docstring).
# A value already in the environment wins; a CPU without AVX2 falls back to its own kernels.
NUMERICS_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2,STRICT"}


@contextlib.contextmanager
def pin_numerics(threads: int = PRETRAIN_THREADS):
    """Within the block, training arithmetic depends on the inputs only: a fixed intra-op thread
    count and deterministic kernels (warn, not fail, where an op has none on the GPU). Restores
    the process's settings afterwards (pretrain() also runs inside the test process)."""
    before = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(), \
        torch.is_deterministic_algorithms_warn_only_enabled()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        torch.use_deterministic_algorithms(before[1], warn_only=before[2])


# --- data: the corpus as one token stream --------------------------------------------------------

def corpus_stream(tokenizer, corpus: Path) -> torch.Tensor:
    """The whole corpus as one id stream (no BOS inside: each window gets its own)."""
    ids = tokenizer(corpus.read_text(), add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def window_batch(stream: torch.Tensor, step: int, batch_size: int, seq_len: int, bos_id: int,
                 seed: int) -> torch.Tensor:
    """(B, seq_len) windows at random offsets, BOS first. Seeded by (seed, step), so a resumed
    run draws exactly the batches an uninterrupted one would."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, len(stream) - seq_len + 1, (batch_size,), generator=g)
    body = torch.stack([stream[s:s + seq_len - 1] for s in starts.tolist()])  # (B, L-1)
    return torch.cat([torch.full((batch_size, 1), bos_id), body], dim=1)  # (B, L)


def answer_letter_ids(tokenizer) -> torch.Tensor:
    """Ids of " A".." D": single tokens by construction of the tokenizer."""
    return torch.tensor([tokenizer(letter, add_special_tokens=False)["input_ids"][0]
                         for letter in ANSWER_LETTERS])


def weighted_lm_loss(logits: torch.Tensor, ids: torch.Tensor, answer_ids: torch.Tensor,
                     answer_weight: float) -> torch.Tensor:
    """Next-token cross-entropy, answer-letter targets weighted by `answer_weight`.

    logits (B, L, V), ids (B, L). A weight of 1 is the plain causal-LM loss."""
    targets = ids[:, 1:]  # (B, L-1)
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), reduction="none")
    weights = 1.0 + (answer_weight - 1.0) * torch.isin(targets, answer_ids).flatten().float()
    return (ce * weights).sum() / weights.sum()


# --- tiny MMLU: the evaluation stage's harness-format scorer -----------------------------------

def mmlu_accuracy(llm, tokenizer, mmlu_dir: Path, shots: int) -> dict:
    """The result as eval.mmlu would score it (xfusion.mmlu: 5-shot, no BOS, log-likelihood of
    " A".." D"), so the number printed here is the number Table 1 shows for the base model."""
    llm.eval()
    loglik = causal_lm_loglik(lambda ids, mask: llm(input_ids=ids, attention_mask=mask).logits,
                              llm.config.max_position_embeddings, batch_size=8, dev=llm.device)
    result = evaluate_mmlu(load_mmlu(mmlu_dir), tokenizer, loglik, shots)
    return {"metric": "mmlu", "value": result["accuracy"], "n": result["n"], "run": None,
            "step": None, "details": {"per_subject": result["per_subject"],
                                      "macro": result["macro"], "shots": shots}}


# --- the two scales ----------------------------------------------------------------------------

def pretrain(cfg: RunConfig, tokenizer_dir: Path, corpus: Path, mmlu_dir: Path, out: Path) -> dict:
    """Pretrain the tiny Llama with checkpoint/resume (pinned numerics); returns the MMLU result."""
    with pin_numerics():
        return _pretrain(cfg, tokenizer_dir, corpus, mmlu_dir, out)


def _pretrain(cfg: RunConfig, tokenizer_dir: Path, corpus: Path, mmlu_dir: Path, out: Path) -> dict:
    base = cfg.model.base_lm
    # Setup: seed, tokenizer, model, engine.
    torch.manual_seed(cfg.training.seed)
    tok = load_tokenizer(tokenizer_dir)
    llm = build_tiny_llama(base.tiny, len(tok), tok.bos_token_id, tok.eos_token_id,
                           tok.pad_token_id)
    training = dataclasses.replace(cfg.training, steps=base.pretrain_steps, lr=base.pretrain_lr,
                                   warmup_steps=base.pretrain_warmup_steps)
    engine = Engine(llm, [{"params": list(llm.parameters()), "lr": base.pretrain_lr}], training,
                    micro_batch_size=base.pretrain_batch_size, lr_decay="cosine")
    stream = corpus_stream(tok, corpus)
    answer_ids = answer_letter_ids(tok).to(engine.device)
    identity = {"variant": "pretrain_lm", "base_model_hash": None,
                "base_lm": json.loads(json.dumps(dataclasses.asdict(base)))}
    ckpt_dir, start = out / "checkpoints", 0
    if (latest := checkpoint.latest(ckpt_dir)) is not None:  # resume after a kill
        ckpt = checkpoint.load(latest, identity)
        engine.load(ckpt.engine_dir)  # weights, optimizer state, schedule, counters
        checkpoint.set_rng_state(ckpt.rng)
        start = ckpt.step
        print(f"resuming {out} from step {start}")

    # Loop: flat and visible.
    llm.train()
    bar = tqdm(range(start, base.pretrain_steps), initial=start, total=base.pretrain_steps,
               desc=f"pretrain {base.name}", disable=rank() != 0)
    t0, tokens = time.perf_counter(), 0
    for step in bar:
        ids = window_batch(stream, step, base.pretrain_batch_size, base.pretrain_seq_len,
                           tok.bos_token_id, cfg.training.seed).to(engine.device)
        loss = weighted_lm_loss(engine.module(input_ids=ids).logits, ids, answer_ids,
                                base.answer_loss_weight)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"pretrain step {step + 1}: loss is {loss.item()}; last good "
                                     f"checkpoint: {checkpoint.latest(ckpt_dir)}")
        engine.backward(loss)
        engine.step()
        tokens += ids.numel()
        if (step + 1) % cfg.training.log_every == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{engine.lr:.2e}",
                            tok_s=f"{tokens / (time.perf_counter() - t0):.0f}")
        if (step + 1) % cfg.training.checkpoint_every == 0 and step + 1 < base.pretrain_steps:
            checkpoint.save(ckpt_dir, step + 1, model=llm, save_engine=engine.save,
                            data_state={"step": step + 1}, meta=identity,
                            keep_last=cfg.training.keep_last)

    # Measure the result on the tiny MMLU, then save the HF model + tokenizer and the refs.
    result = mmlu_accuracy(llm, tok, mmlu_dir, cfg.evaluation.mmlu_shots)
    result["details"]["pretrain_steps"] = base.pretrain_steps
    if rank() == 0:
        with atomic_dir(out / "hf") as tmp:
            llm.save_pretrained(tmp)
            tok.save_pretrained(tmp)
        atomic_write_json(out / "pretrain_mmlu.json", result)
        atomic_write_json(out / "base_model.json", {"path": "hf", "tokenizer": "hf",
                                                    "text_weight_hash": text_weight_hash(llm)})
    return result


def name_pretrained(cfg: RunConfig, tokenizer_dir: Path, out: Path) -> None:
    """Paper scale: base_model.json for `model.base_lm.path`, hash from its loaded weights."""
    ref = {"path": cfg.model.base_lm.path, "tokenizer": str(tokenizer_dir), "text_weight_hash": ""}
    out.mkdir(parents=True, exist_ok=True)
    probe = out / ".base_model.probe.json"
    atomic_write_json(probe, ref)
    try:
        llm, _ = load_base_llm(probe)  # the loader training uses, so dtype and hash agree
    finally:
        probe.unlink()
    atomic_write_json(out / "base_model.json", {**ref, "text_weight_hash": text_weight_hash(llm)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--run", default=None, help="a run of config.experiments (its base_lm)")
    parser.add_argument("--tokenizer", required=True, type=Path, help="R/tokenizer")
    parser.add_argument("--corpus", required=True, type=Path, help="R/world/corpus.txt")
    parser.add_argument("--mmlu", required=True, type=Path, help="R/world/mmlu")
    parser.add_argument("--out", required=True, type=Path, help="R/base_lm/<name>")
    args = parser.parse_args()
    for key, value in NUMERICS_ENV.items():  # before the first kernel: read once per process
        os.environ.setdefault(key, value)
    cfg = load_run(args.config, args.run)
    if cfg.model.base_lm.source == "pretrained":
        name_pretrained(cfg, args.tokenizer, args.out)
        print(f"wrote {args.out / 'base_model.json'} for {cfg.model.base_lm.path}")
        return
    start = time.perf_counter()
    result = pretrain(cfg, args.tokenizer, args.corpus, args.mmlu, args.out)
    print(f"{cfg.model.base_lm.name}: tiny MMLU {result['value']:.3f} over {result['n']} items "
          f"(chance 0.25), {time.perf_counter() - start:.0f}s; per subject "
          + ", ".join(f"{s} {a:.2f}" for s, a in result["details"]["per_subject"].items()))


if __name__ == "__main__":
    main()
