"""A metric job killed mid-way leaves no output that a rerun would take as complete, and the
rerun's output equals an uninterrupted run's (eval.mmlu through its CLI, SIGKILL mid-scoring)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# A scorer that prefers the gold letter of each question; with KILL_AFTER set, the process
# SIGKILLs itself after that many scored questions (mid-run, before any output is written).
SCRIPT = """
import os, signal, sys, torch
sys.path.insert(0, sys.argv[1])  # tests/: test_mmlu's character tokenizer and gold scorer
from test_mmlu import CharTokenizer, oracle_loglik
from eval import mmlu

gold_loglik = oracle_loglik(mmlu.load_mmlu(sys.argv[2]))
kill_after, scored = int(os.environ.get("KILL_AFTER", "0")), [0]

def loglik(contexts, continuations):
    out = []
    for c, k in zip(contexts, continuations):
        scored[0] += 1
        if kill_after and scored[0] > 4 * kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        out.append(gold_loglik([c], [k]))
    return torch.cat(out)

mmlu.base_lm_scorer = lambda path, batch_size: (CharTokenizer(), loglik)
mmlu.main(sys.argv[3:])
"""


def _write_mmlu(root: Path) -> None:
    rows = {split: [[f"{split} q{i}?", "w", "x", "y", "z", "ABCD"[(i * 3) % 4]]
                    for i in range(5 if split == "dev" else 16)] for split in ("dev", "test")}
    for split, items in rows.items():
        path = root / "mmlu" / split / f"toy_{split}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as fh:
            csv.writer(fh).writerows(items)


def _run(tmp_path: Path, out: Path, kill_after: int | None):
    (tmp_path / "base_model.json").write_text(json.dumps(
        {"path": "x", "tokenizer": "x", "text_weight_hash": "abc"}))
    env = {**os.environ, "KILL_AFTER": str(kill_after or 0), "OMP_NUM_THREADS": "1"}
    args = ["--config", "config/tiny.yaml", "--base-lm", str(tmp_path / "base_model.json"),
            "--data", str(tmp_path / "mmlu"), "--batch-size", "1", "--out", str(out)]
    cmd = [sys.executable, "-c", SCRIPT, str(REPO / "tests"), str(tmp_path / "mmlu"), *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_mmlu_killed_mid_scoring_leaves_nothing_and_rerun_equals_uninterrupted(tmp_path):
    _write_mmlu(tmp_path)
    reference = tmp_path / "reference.json"
    assert _run(tmp_path, reference, None).returncode == 0

    out = tmp_path / "metrics" / "mmlu.json"
    killed = _run(tmp_path, out, kill_after=6)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not out.exists()  # nothing a rerun (or Snakemake) could take as complete

    assert _run(tmp_path, out, None).returncode == 0
    assert json.loads(out.read_text()) == json.loads(reference.read_text())
