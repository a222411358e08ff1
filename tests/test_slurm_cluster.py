"""Table 1 through a real SLURM cluster: the user's command shape, `snakemake --profile <slurm
profile>`, with real `sbatch` jobs and the train rule as a 2-task `srun` job (two DeepSpeed ranks
over gloo on the CPU).

The cluster is the single-node one of `tests/slurm/cluster.sh up` (`.ci/run` brings it up and
sets XFUSION_SLURM_REQUIRED=1; `make test-slurm` does both). Without it the test skips, saying
why; with XFUSION_SLURM_REQUIRED=1 it fails instead. The profile is generated from
workflow/profiles/slurm/config.yaml by tests/slurm/ci_profile.py (debug partition, no GPUs,
small memory, squeue status); the recipe is test_pipeline_e2e's REDUCED one with Table 1 cut to
two variants (single_tower trains the text weights, dual_tower keeps them frozen): some 25 SLURM
jobs on 2 CPUs. Run it alone, or with `--basetemp`: another pytest session on the same machine
prunes old /tmp/pytest-of-* directories, the DAG's work directory among them.

Checked: table1.csv has its rows; the plugin submitted the train jobs with `--ntasks=2
--cpus-per-task=1` (its `sbatch call:` debug line) and ran `srun --ntasks=2 …` inside them; each
of the two ranks logged "rank r of 2 (…, slurm)"; MLflow's world_size tag is 2.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import LAUNCHER_VARIABLES
from test_pipeline_e2e import REDUCED
from xfusion.config import apply_overrides, load_yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "tests" / "slurm" / "cluster.sh"
SNAKEMAKE = Path(sys.executable).with_name("snakemake")
RUNS = ("single_tower", "dual_tower")
TASKS = 2
DAG_TIMEOUT = 1500  # s; measured run times are in the README ("Paper scale on SLURM")
pytestmark = pytest.mark.timeout(DAG_TIMEOUT + 300)

_spec = importlib.util.spec_from_file_location("ci_profile", ROOT / "tests" / "slurm" / "ci_profile.py")
ci_profile = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ci_profile)


@pytest.fixture(scope="module")
def slurm_cluster() -> None:
    """An idle node of tests/slurm/cluster.sh's cluster, or a skip (a failure under
    XFUSION_SLURM_REQUIRED=1) that says what is missing."""
    why = None
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        why = "no SLURM here (sinfo/sbatch not on PATH)"
    else:
        proc = subprocess.run(["bash", str(CLUSTER), "status"], capture_output=True, text=True,
                              timeout=60)
        if proc.returncode != 0:
            why = f"the SLURM node is not idle: {' / '.join(proc.stdout.split(chr(10))[-4:])}"
    if why:
        why += "; start one with `bash tests/slurm/cluster.sh up` (root)"
        if os.environ.get("XFUSION_SLURM_REQUIRED") == "1":
            pytest.fail(f"XFUSION_SLURM_REQUIRED=1 but {why}")
        pytest.skip(why)


@pytest.fixture(scope="module")
def slurm_table1(slurm_cluster, tmp_path_factory):
    work = tmp_path_factory.mktemp("slurm_table1")
    raw = apply_overrides(load_yaml(ROOT / "config" / "tiny.yaml"), REDUCED)
    table1 = raw["experiments"]["table1"]
    table1["runs"] = {name: over for name, over in table1["runs"].items() if name in RUNS}
    raw["experiments"] = {"table1": table1}
    config = work / "config.yaml"
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    profile = ci_profile.write_ci_profile(work / "profile", config, tasks=TASKS,
                                          logdir=work / "slurm_logs")
    # The jobs inherit this environment (sbatch --export=ALL): no launcher variables of this
    # process, no SLURM variables of an enclosing allocation.
    env = {k: v for k, v in os.environ.items()
           if k not in LAUNCHER_VARIABLES and not k.startswith("SLURM_")}
    # A private torch extension dir: DeepSpeed's CPU comm op is compiled once for this run (the
    # two ranks share the build lock) and never waits on another process's rebuild.
    env.update(DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               TORCH_EXTENSIONS_DIR=str(work / "torch_extensions"),
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    # The user's command (README), plus -s: the DAG runs in `work`, not in the repository.
    # SIGINT, not SIGTERM: only SIGINT stops the plugin's status loop (and cancels its jobs).
    cmd = ["timeout", "-s", "INT", "-k", "60", str(DAG_TIMEOUT), str(SNAKEMAKE),
           "--profile", str(profile), "-s", str(ROOT / "Snakefile"), "--verbose",
           "results/table1.csv"]
    t0 = time.monotonic()
    with open(work / "snakemake.log", "w") as log:
        proc = subprocess.run(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    elapsed = time.monotonic() - t0
    output = (work / "snakemake.log").read_text()
    print(f"snakemake --profile <slurm-ci> results/table1.csv: {elapsed:.0f} s, rc {proc.returncode}")
    if proc.returncode != 0:
        logs = "\n".join(f"--- {p}\n{p.read_text()[-1500:]}"
                         for p in sorted((work / "results").rglob("*.log")))
        slurm = "\n".join(f"--- {p}\n{p.read_text()[-1500:]}"
                          for p in sorted((work / "slurm_logs").rglob("*.log")))
        pytest.fail(f"snakemake rc {proc.returncode} after {elapsed:.0f} s\n"
                    f"{output[-5000:]}\n--- job logs ---\n{logs[-5000:]}\n"
                    f"--- slurm logs ---\n{slurm[-4000:]}")
    return work, output


def sbatch_calls(output: str, rule: str) -> list[str]:
    """The plugin's `sbatch call: …` debug lines (--verbose) for jobs of `rule`."""
    calls = [line.split("sbatch call: ", 1)[1] for line in output.splitlines()
             if "sbatch call: " in line]
    return [c for c in calls if f"rule_{rule}_" in c]


@pytest.mark.slow
def test_table1_through_slurm_has_its_rows(slurm_table1):
    work, _ = slurm_table1
    table = pd.read_csv(work / "results" / "table1.csv")
    variants = list(table.iloc[:, 0])
    assert set(RUNS) <= set(variants) and len(variants) == len(RUNS) + 1, variants  # + base row
    trained = table[table.iloc[:, 0].isin(RUNS)]
    assert trained[["mmlu", "fid", "clip", "blip"]].notna().all().all(), table


@pytest.mark.slow
def test_every_job_went_through_sbatch(slurm_table1):
    _, output = slurm_table1
    calls = [line for line in output.splitlines() if "sbatch call: " in line]
    assert len(calls) >= 20, "every job of the DAG but the local aggregate runs as a SLURM job"
    assert all(" -p debug" in c or "-p 'debug'" in c for c in calls), calls[:3]
    assert not any("--gpus" in c or "--ntasks-per-gpu" in c for c in calls)


@pytest.mark.slow
def test_train_job_is_a_two_task_srun_job(slurm_table1):
    work, output = slurm_table1
    calls = sbatch_calls(output, "train_run")
    assert len(calls) == len(RUNS), calls
    for call in calls:
        assert f"--ntasks={TASKS}" in call and "--cpus-per-task=1" in call, call
        assert "--mem 4000" in call, call
    for run in RUNS:
        log = (work / "results" / "tiny" / "logs" / "train_run" / f"{run}.log").read_text()
        ranks = re.findall(r"xfusion\.engine: rank (\d+) of (\d+) \(local rank \d+, (\w+)\)", log)
        assert sorted(ranks) == [("0", "2", "slurm"), ("1", "2", "slurm")], log[-3000:]
    # The jobstep ran the rule's shell once, which started srun itself (printshellcmds in the
    # kept SLURM log of each train job).
    slurm_logs = "\n".join(p.read_text() for p in (work / "slurm_logs").rglob("*.log")
                           if "rule_train_run" in str(p))
    assert slurm_logs.count(f"srun --ntasks={TASKS} --kill-on-bad-exit=1 ") >= len(RUNS), \
        slurm_logs[-3000:]


@pytest.mark.slow
def test_two_ranks_trained_one_run(slurm_table1):
    from mlflow.tracking import MlflowClient

    work, _ = slurm_table1
    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'results' / 'tiny' / 'mlruns.db'}")
    for run in RUNS:
        run_dir = work / "results" / "tiny" / "runs" / run
        run_id = (run_dir / "mlflow_run_id.txt").read_text().strip()
        assert client.get_run(run_id).data.tags["world_size"] == str(TASKS), run
        assert (run_dir / "done.json").is_file()
