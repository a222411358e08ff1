"""Submit a paper-scale training job through the real slurm executor plugin, to fake SLURM tools.

Fake `sbatch`, `srun`, `sacct`, `squeue`, `scontrol` and `sinfo` on PATH record their arguments.
The fake sbatch runs the job script the plugin wraps (a `snakemake --executor slurm-jobstep` call)
at once, in the `-D` directory, then reports the job COMPLETED (or FAILED) to sacct. Inside that
job the rule's own shell runs: `srun --ntasks=8 … python -m xfusion.train … --out R/runs/RUN`.
The fake srun records its flags and, for xfusion.train, writes `done.json` under `--out` instead
of training (any other command it runs as is). Upstream files of the train job are created up
front, so the target `R/runs/dual_tower/done.json` needs exactly one job: the train job.
The test then checks the sbatch flags (GPUs, tasks, memory, time, partition) and the srun flags.
"""

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).with_name("snakemake")

FAKE_SBATCH = r'''
import json, os, subprocess, sys
from pathlib import Path
state = Path(os.environ["FAKE_SLURM_DIR"])
args = sys.argv[1:]
jobs = state / "jobs.jsonl"
jobid = str(1000 + (len(jobs.read_text().splitlines()) if jobs.exists() else 0))
script = next((a[len("--wrap="):] for a in args if a.startswith("--wrap=")), None)
if script is None and args and args[-1] == "/dev/stdin":
    script = sys.stdin.read()
workdir = args[args.index("-D") + 1] if "-D" in args else os.getcwd()
logfile = args[args.index("--output") + 1].replace("%j", jobid) if "--output" in args else os.devnull
with open(state / "sbatch.jsonl", "a") as fh:
    fh.write(json.dumps({"jobid": jobid, "argv": args}) + "\n")
env = dict(os.environ, SLURM_JOB_ID=jobid, SLURM_JOBID=jobid)
Path(logfile).parent.mkdir(parents=True, exist_ok=True)
with open(logfile, "w") as log:
    rc = subprocess.run(["sh", "-c", script], cwd=workdir, env=env, stdout=log, stderr=log).returncode
with open(jobs, "a") as fh:
    fh.write(json.dumps({"jobid": jobid, "state": "COMPLETED" if rc == 0 else "FAILED"}) + "\n")
print(jobid)
'''

FAKE_SRUN = r'''
import json, os, subprocess, sys
from pathlib import Path
state = Path(os.environ["FAKE_SLURM_DIR"])
args = sys.argv[1:]
with open(state / "srun.jsonl", "a") as fh:
    fh.write(json.dumps({"argv": args}) + "\n")
i = 0
while i < len(args) and args[i].startswith("-"):  # srun's own options (all --opt=value here)
    i += 1
command = args[i:]
if "xfusion.train" in command:
    out = Path(command[command.index("--out") + 1])
    (out / "steps").mkdir(parents=True, exist_ok=True)
    (out / "done.json").write_text(json.dumps({"fake": True}))
    sys.exit(0)
sys.exit(subprocess.run(command).returncode)
'''

FAKE_SACCT = r'''
import json, os, sys
from pathlib import Path
state = Path(os.environ["FAKE_SLURM_DIR"])
with open(state / "sacct.jsonl", "a") as fh:
    fh.write(json.dumps({"argv": sys.argv[1:]}) + "\n")
jobs = state / "jobs.jsonl"
if "--name" in sys.argv and jobs.exists():  # status query: JobIdRaw|State
    for line in jobs.read_text().splitlines():
        job = json.loads(line)
        print(f"{job['jobid']}|{job['state']}")
'''

FAKE_SCONTROL = 'import sys\nprint("MaxArraySize = 1001\\nMinJobAge = 300 sec")\n'
FAKE_SINFO = 'print("slurm 24.05.0")\n'
FAKE_SQUEUE = ''


def fake_bin(tmp: Path) -> Path:
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    for name, body in (("sbatch", FAKE_SBATCH), ("srun", FAKE_SRUN), ("sacct", FAKE_SACCT),
                       ("scontrol", FAKE_SCONTROL), ("sinfo", FAKE_SINFO),
                       ("squeue", FAKE_SQUEUE)):
        path = bin_dir / name
        path.write_text(f"#!{sys.executable}\n{textwrap.dedent(body)}")
        path.chmod(0o755)
    return bin_dir


def upstream_of_training(r: Path, base: str) -> None:
    """The train job's inputs and their own upstream, oldest first (so nothing is outdated)."""
    files = ["world/train/scenes.jsonl", "world/heldout/scenes.jsonl", "world/train/images/",
             "world/heldout/images/", "captions/train.jsonl", "captions/train.bad_inputs.json",
             "captions/heldout.jsonl", "captions/heldout.bad_inputs.json", "tokenizer/",
             "latents/train.safetensors", "latents/train.bad_inputs.json",
             f"base_lm/{base}/base_model.json"]  # the gathers' outputs: no shard job needed
    now = time.time() - 1000
    for i, rel in enumerate(files):
        path = r / rel
        if rel.endswith("/"):
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("{}\n")
        os.utime(path, (now + i, now + i))


def test_train_job_submitted_with_gpus_tasks_memory_time(tmp_path, paper_config):
    raw, paper_env = paper_config  # its data folders and base LLMs resolvable here
    r = tmp_path / "results" / "paper"
    raw["results_dir"] = str(r)
    config = tmp_path / "paper.yaml"
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    upstream_of_training(r, raw["model"]["base_lm"]["name"])
    state = tmp_path / "slurm"
    state.mkdir()
    env = dict(paper_env, PATH=f"{fake_bin(tmp_path)}:{os.environ['PATH']}",
               FAKE_SLURM_DIR=str(state), OMP_NUM_THREADS="1")
    target = r / "runs" / "dual_tower" / "done.json"
    proc = subprocess.run(
        [str(SNAKEMAKE), str(target), "--profile", "slurm", "--configfile", str(config),
         "--slurm-init-seconds-before-status-checks", "1", "--seconds-between-status-checks", "1",
         "--slurm-logdir", str(tmp_path / "slurm_logs"), "--latency-wait", "5"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert target.exists()

    submissions = [json.loads(l) for l in (state / "sbatch.jsonl").read_text().splitlines()]
    assert len(submissions) == 1, "only the train job should run"
    argv = submissions[0]["argv"]
    flags = " ".join(argv)
    assert "--comment rule_train_run_wildcards_dual_tower" in flags
    assert "--gpus=8" in argv                      # 8 GPUs ...
    assert "--ntasks-per-gpu=1" in argv            # ... one task (DeepSpeed rank) each
    assert "--ntasks=8" in argv
    assert argv[argv.index("--mem") + 1] == "480000"
    assert argv[argv.index("-t") + 1] == "4320"
    assert argv[argv.index("-p") + 1] == "gpu"
    assert "--cpus-per-task=8" in argv

    launches = [json.loads(l)["argv"] for l in (state / "srun.jsonl").read_text().splitlines()]
    train = [a for a in launches if "xfusion.train" in a]
    assert len(train) == 1, launches
    assert train[0][:2] == ["--ntasks=8", "--kill-on-bad-exit=1"]
    assert train[0][train[0].index("--run") + 1] == "dual_tower"
    assert not any(a[:1] == ["-n1"] for a in launches), "the jobstep must not wrap it in srun -n1"
