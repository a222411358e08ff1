"""xfusion.train over 2 processes (gloo, fp32, CPU): 2 ranks x 1 micro-batch, 1 rank x 2
accumulated micro-batches and 1 rank x 1 batch train the same weights; a SIGKILLed 2-rank run
resumes to the uninterrupted one's weights; torchrun- and srun-style launches both work."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import LAUNCHER_VARIABLES
from test_train import _argv, world  # noqa: F401  (the tiny world fixture)
from xfusion import checkpoint
from xfusion.config import apply_overrides, load_yaml
from xfusion.io import read_jsonl

REPO = Path(__file__).resolve().parents[1]
STEPS = 6
SEQ = 16 + 24 + 4  # image tokens + caption budget + specials (test_train's world)
RUN = {"training.steps": STEPS, "training.checkpoint_every": 2, "training.keep_last": 2,
       "training.eval_steps": [STEPS], "training.tokens_per_batch": 4 * SEQ}


def _free_port(lo: int = 20000, hi: int = 60000) -> int:
    for port in range(lo, hi):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


def _config(world, tmp_path: Path, name: str, **overrides) -> dict:  # noqa: F811
    raw = apply_overrides(load_yaml(world["config"]), {**RUN, **overrides})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return {**world, "config": path}


def _launch(world, out: Path, ranks: int = 1, style: str = "torchrun"  # noqa: F811
            ) -> list[subprocess.Popen]:
    """`ranks` processes of xfusion.train with the variables torchrun (RANK, WORLD_SIZE, …) or
    `srun -n <ranks>` (SLURM_PROCID, SLURM_STEP_NUM_TASKS, …, SLURM_JOB_ID) would set."""
    base = {k: v for k, v in os.environ.items()
            if k not in LAUNCHER_VARIABLES and not k.startswith("SLURM_")}
    base.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu")
    if style == "torchrun":
        port = _free_port()
        per_rank = [dict(RANK=str(r), WORLD_SIZE=str(ranks), LOCAL_RANK=str(r),
                         MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)) for r in range(ranks)]
    else:  # the port derives from the job id: choose an id whose port is free here
        job = _free_port(15000, 35000) - 15000
        per_rank = [dict(SLURM_PROCID=str(r), SLURM_NTASKS=str(ranks), SLURM_LOCALID=str(r),
                         SLURM_JOB_NODELIST=socket.gethostname(), SLURM_JOB_ID=str(job),
                         SLURM_STEP_NUM_TASKS=str(ranks), SLURM_STEP_ID="0")
                    for r in range(ranks)]
    if ranks == 1 and style == "torchrun":
        per_rank = [{}]  # a plain single-process run
    return [subprocess.Popen([sys.executable, "-m", "xfusion.train", *_argv(world, out)],
                             cwd=REPO, env={**base, **env}, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for env in per_rank]


def _finish(procs: list[subprocess.Popen]) -> list[str]:
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    return outputs


def _weights(out: Path, step: int = STEPS) -> dict[str, torch.Tensor]:
    return load_file(str(out / "steps" / str(step) / "trainable.safetensors"))


def _max_rel_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max().clamp(min=1e-12)).item() for k in a)


@pytest.fixture(scope="module")
def two_ranks_mixed(world, tmp_path_factory):  # noqa: F811
    """An uninterrupted 2-rank (torchrun-style) run on the mixed T2I/I2T recipe."""
    tmp = tmp_path_factory.mktemp("mixed")
    w = _config(world, tmp, "mixed")
    out = tmp / "runs" / "dual_tower"
    outputs = _finish(_launch(w, out, ranks=2))
    assert "rank 1 of 2 (local rank 1, torchrun)" in "".join(outputs)
    return {"world": w, "out": out}


def test_two_ranks_equal_one_rank_accumulating_two_micro_batches(two_ranks_mixed, tmp_path):
    # The same 4 global samples split into the same 2 parts, on 2 ranks or in 2 micro-batches:
    # the same gradient (mean of the 2 micro-batch losses), up to fp32 summation order.
    w = _config(two_ranks_mixed["world"], tmp_path, "accum",
                **{"training.micro_tokens_per_batch": 2 * SEQ})
    out = tmp_path / "runs" / "dual_tower"
    _finish(_launch(w, out, ranks=1))
    diff = _max_rel_diff(_weights(out), _weights(two_ranks_mixed["out"]))
    print(f"2 ranks x 1 vs 1 rank x 2, mixed tasks: max relative weight difference {diff:.2e}")
    assert diff < 1e-6  # measured 0: gloo's mean of 2 and DeepSpeed's loss / 2 round alike
    logs = [read_jsonl(d / "train_log.jsonl") for d in (out, two_ranks_mixed["out"])]
    assert [r["t2i_tokens_seen"] for r in logs[0]] == [r["t2i_tokens_seen"] for r in logs[1]]


@pytest.mark.slow  # three runs: about 2.5 min on 2 busy cores
def test_srun_two_ranks_accumulation_and_one_batch_train_the_same_weights(
        world, tmp_path):  # noqa: F811
    # All-T2I: every micro-batch's DM loss is a mean over its own 2 samples, so the mean of the
    # micro-batch losses is exactly the mean over all 4: even one batch of 4 is the same math.
    common = {"training.t2i_ratio": 1.0}
    runs = {}
    for name, ranks, style, micro in (("srun_2x1", 2, "slurm", None), ("1x2", 1, "torchrun", 2),
                                      ("1x1", 1, "torchrun", None)):
        w = _config(world, tmp_path, name, **common,
                    **{"training.micro_tokens_per_batch": micro and micro * SEQ})
        runs[name] = tmp_path / name / "runs" / "dual_tower"
        outputs = _finish(_launch(w, runs[name], ranks=ranks, style=style))
        if style == "slurm":
            assert "rank 1 of 2 (local rank 1, slurm)" in "".join(outputs)
    # 1x2 vs 2x1: the same micro-batches, measured bitwise equal. 1x1: one batch of 4 (other
    # padding length, other summation order of the mean), measured 1.3e-5 of each tensor's
    # largest weight after 6 steps: fp32 rounding that Adam's g / sqrt(v) amplifies where g ~ 0.
    for name, tol in (("1x2", 1e-6), ("1x1", 5e-5)):
        diff = _max_rel_diff(_weights(runs[name]), _weights(runs["srun_2x1"]))
        print(f"{name} vs 2x1 (srun-style), all T2I: max relative weight difference {diff:.2e}")
        assert diff < tol, name


@pytest.mark.slow  # a killed and a resumed 2-rank run: about 80 s on 2 busy cores
def test_sigkill_of_two_ranks_then_srun_style_rerun_resumes_to_the_uninterrupted_weights(
        two_ranks_mixed, tmp_path):
    w, full = two_ranks_mixed["world"], two_ranks_mixed["out"]
    killed = tmp_path / "runs" / "dual_tower"
    procs = _launch(w, killed, ranks=2)
    deadline = time.time() + 600
    while checkpoint.latest(killed / "checkpoints") is None and all(p.poll() is None
                                                                      for p in procs):
        assert time.time() < deadline
        time.sleep(0.02)
    for p in procs:
        p.send_signal(signal.SIGKILL)
    for p in procs:
        p.communicate()
    assert not (killed / "done.json").exists(), "the run finished before it could be killed"
    shards = sorted(p.name for p in (checkpoint.latest(killed / "checkpoints") / "deepspeed"
                                     ).iterdir())
    assert [s for s in shards if s.startswith("zero_pp_rank")] == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    outputs = _finish(_launch(w, killed, ranks=2, style="slurm"))  # same ranks, other launcher
    assert all("resuming dual_tower" in o for o in outputs)
    a, b = _weights(full), _weights(killed)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    log = [r["step"] for r in read_jsonl(killed / "train_log.jsonl")]
    assert log == list(range(1, STEPS + 1))
