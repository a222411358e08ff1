"""The tiny DAG end to end, for a reduced recipe: world -> captions -> base LM -> judges -> four
trained variants -> samples -> metrics -> results/table1.csv (+ its figure-free aggregate).

Real jobs, real models, only fewer steps and images than config/tiny.yaml. Marked slow: a few
minutes on 2 cores.
"""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from xfusion.config import apply_overrides, load_yaml

ROOT = Path(__file__).resolve().parents[1]
# The module's first test pays for the whole DAG run (a few minutes; more on a busy machine).
pytestmark = pytest.mark.timeout(1800)
REDUCED = {
    "data.n_train": 240,
    "data.n_heldout": 48,
    "data.mmlu_test_per_subject": 8,
    "data.n_corpus_descriptions": 200,
    "model.base_lm.pretrain_steps": 40,
    "model.base_lm.pretrain_batch_size": 8,
    "training.steps": 12,
    "training.warmup_steps": 2,
    "training.checkpoint_every": 6,
    "training.eval_steps": [12],
    "training.tokens_per_batch": 512,
    "evaluation.n_samples": 12,
    "evaluation.sample_steps": 3,
    "evaluation.sample_batch_size": 12,
    "evaluation.caption_max_tokens": 8,
    "evaluation.judge_steps": 20,
    "evaluation.probe_epochs": 2,
    "evaluation.attr_steps": 20,
}


@pytest.fixture(scope="module")
def table1(tmp_path_factory):
    work = tmp_path_factory.mktemp("e2e")
    raw = apply_overrides(load_yaml(ROOT / "config" / "tiny.yaml"), REDUCED)
    raw["experiments"] = {"table1": raw["experiments"]["table1"]}
    config = work / "config.yaml"
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory",
           str(work), "--cores", "2", "results/table1.csv", "--configfile", str(config)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500)
    logs = "\n".join(p.read_text()[-2000:] for p in (work / "results").rglob("*.log"))
    assert proc.returncode == 0, proc.stderr[-6000:] + "\n--- job logs ---\n" + logs[-6000:]
    return work, pd.read_csv(work / "results" / "table1.csv")


@pytest.mark.slow
def test_table1_has_the_paper_columns_and_rows(table1):
    _, table = table1
    for col in ("mmlu", "fid", "clip", "blip", "paper_mmlu", "paper_fid", "paper_clip", "paper_blip"):
        assert col in table.columns, col
    variants = set(table.iloc[:, 0])
    assert {"single_tower", "gated_tower", "dual_projection", "dual_tower"} <= variants
    assert len(variants) == 5  # + the base LLM row
    trained = table[table.iloc[:, 0].isin(["single_tower", "gated_tower", "dual_projection",
                                           "dual_tower"])]
    assert trained[["fid", "clip", "blip"]].notna().all().all()
    assert (trained["paper_fid"] > 0).all()


@pytest.mark.slow
def test_frozen_variants_keep_the_base_mmlu(table1):
    _, table = table1
    by_variant = table.set_index(table.columns[0])
    base = by_variant.loc[~by_variant.index.isin(["single_tower", "gated_tower",
                                                  "dual_projection", "dual_tower"]), "mmlu"]
    assert len(base) == 1
    for frozen in ("gated_tower", "dual_projection", "dual_tower"):
        assert by_variant.loc[frozen, "mmlu"] == base.iloc[0], frozen


@pytest.mark.slow
def test_every_trained_variant_logged_to_mlflow(table1):
    work, _ = table1
    for run in ("single_tower", "gated_tower", "dual_projection", "dual_tower"):
        run_dir = work / "results" / "tiny" / "runs" / run
        assert (run_dir / "done.json").exists() and (run_dir / "mlflow_run_id.txt").exists()


@pytest.mark.slow
def test_eval_metrics_land_in_the_runs_mlflow_history_at_the_evaluated_step(table1):
    from mlflow.tracking import MlflowClient

    work, _ = table1
    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'results' / 'tiny' / 'mlruns.db'}")
    run_dir = work / "results" / "tiny" / "runs" / "dual_tower"
    run_id = (run_dir / "mlflow_run_id.txt").read_text().strip()
    for metric in ("fid", "clip", "blip", "mmlu"):
        history = client.get_metric_history(run_id, metric)
        assert [m.step for m in history] == [12], metric
    assert client.get_run(run_id).data.tags["scale"] == "tiny"
