"""The tiny DAG end to end, for a reduced recipe: world -> captions -> base LM -> judges -> four
trained variants -> samples -> metrics -> results/table1.csv (+ its figure-free aggregate).

Real jobs, real models, only fewer steps and images than config/tiny.yaml. Marked slow: a few
minutes on 2 cores.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from xfusion.config import apply_overrides, load_yaml, resolve_run
from xfusion.io import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
FROZEN = ("gated_tower", "dual_projection", "dual_tower")  # text path frozen: MMLU unchanged
TRAINED = ("single_tower", *FROZEN)
STEP = 12  # training.steps and the one eval step below
# metric file (R/metrics/RUN/STEP/<file>.json) -> Table 1 column; MMLU is a fraction there.
# The CSV keeps 6 significant digits (eval.aggregate): values compare at rel=1e-3.
TABLE_FILES = {"fid": "fid", "clip": "clip", "blip": "blip", "mmlu": "mmlu"}  # file stem -> column
# The module's first test pays for the whole DAG run (a few minutes; more on a busy machine).
pytestmark = pytest.mark.timeout(1800)
REDUCED = {
    "seeds": 1,  # one training seed per run: each row is that run's own metric files
    "data.n_train": 240,
    "data.n_heldout": 48,
    "data.mmlu_test_per_subject": 8,
    "data.n_corpus_descriptions": 200,
    "model.base_lm.pretrain_steps": 40,
    "model.base_lm.pretrain_batch_size": 8,
    "training.steps": STEP,
    "training.warmup_steps": 2,
    "training.checkpoint_every": 6,
    "training.eval_steps": [STEP],
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


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _results(work: Path) -> Path:
    return work / "results" / "tiny"


def _raw_config(work: Path) -> dict:
    return load_yaml(work / "config.yaml")


def _base_mmlu(work: Path) -> Path:
    base = resolve_run(_raw_config(work), "dual_tower").model.base_lm.name
    return _results(work) / "metrics" / "base" / base / "mmlu.json"


@pytest.mark.slow
def test_table1_shows_each_runs_metric_files_beside_the_papers_numbers(table1):
    work, table = table1
    reference = yaml.safe_load((ROOT / "reference" / "paper_results.yaml").read_text())
    paper = reference["xfusion"]["table1"]["rows"]
    rows = table.set_index(table.columns[0])
    assert len(rows) == 5 and set(TRAINED) <= set(rows.index)  # + the base LLM's row
    for run in TRAINED:
        for stem, column in TABLE_FILES.items():
            record = _json(_results(work) / "metrics" / run / str(STEP) / f"{stem}.json")
            value = record["value"] * (100 if column == "mmlu" else 1)
            assert rows.loc[run, column] == pytest.approx(value, rel=1e-3), (run, column)
            assert rows.loc[run, f"paper_{column}"] == paper[run][column], (run, column)
    (base_row,) = set(rows.index) - set(TRAINED)
    (paper_base,) = set(paper) - set(TRAINED)  # LLaMA3.2-1B
    assert rows.loc[base_row, "mmlu"] == pytest.approx(100 * _json(_base_mmlu(work))["value"],
                                                       rel=1e-3)
    assert rows.loc[base_row, "paper_mmlu"] == paper[paper_base]["mmlu"]


@pytest.mark.slow
def test_frozen_variants_reuse_the_base_mmlu_only_on_a_matching_text_weight_hash(table1):
    """A frozen variant's mmlu.json is the base's, reused after the hash check: the base's
    score names the hash of the weights it was computed on, the run's model dir names the
    base it trained on, and the weights on disk hash to both. single_tower is scored itself."""
    from xfusion.model.base import load_base_llm, text_weight_hash

    work, _ = table1
    base = _json(_base_mmlu(work))
    base_hash = base["details"]["text_weight_hash"]
    for run in TRAINED:
        model_dir = _results(work) / "runs" / run / "steps" / str(STEP)
        ref = model_dir / "base_model.json"
        assert _json(ref)["text_weight_hash"] == base_hash, run
        mmlu = _json(_results(work) / "metrics" / run / str(STEP) / "mmlu.json")
        if run in FROZEN:
            assert (work / mmlu["details"]["reused_from"]).resolve() == _base_mmlu(work).resolve()
            assert mmlu["details"]["text_weight_hash"] == base_hash
            assert (mmlu["value"], mmlu["n"]) == (base["value"], base["n"]), run
        else:  # trained text weights: scored on its own
            assert "reused_from" not in mmlu["details"], run
    llm, _ = load_base_llm(_results(work) / "runs" / "dual_tower" / "steps" / str(STEP)
                           / "base_model.json")
    assert text_weight_hash(llm) == base_hash


@pytest.mark.slow
def test_a_frozen_variants_recomputed_text_logits_and_mmlu_equal_the_base(table1, tmp_path,
                                                                        monkeypatch):
    """What the reuse stands for, recomputed: the trained gated tower's text-only logits on
    MMLU prompts are the base LLM's, bitwise; and given a base score of other text weights
    (another hash), eval.mmlu scores the variant afresh instead of reusing it, and gets the
    base's score."""
    from eval import mmlu as eval_mmlu
    from xfusion.mmlu import build_prompt, load_mmlu
    from xfusion.model import XFusionModel
    from xfusion.model.base import load_base_llm

    work, _ = table1
    monkeypatch.chdir(work)  # where the DAG's jobs run: relative paths in its files are from here
    run, R = "gated_tower", _results(work)
    model_dir = R / "runs" / run / "steps" / str(STEP)
    model = XFusionModel.load(model_dir).eval()
    llm, tokenizer = load_base_llm(model_dir / "base_model.json")
    llm.eval()
    assert model.llm is not llm
    shots = resolve_run(_raw_config(work), run).evaluation.mmlu_shots
    with torch.no_grad():
        for subject, (dev, test) in load_mmlu(R / "world" / "mmlu").items():
            for item in test[:2]:
                ids = torch.tensor([tokenizer(build_prompt(subject, dev[:shots], item),
                                              add_special_tokens=False)["input_ids"]])
                mask = torch.ones_like(ids)
                assert torch.equal(model.text_logits(ids, mask),
                                   llm(input_ids=ids, attention_mask=mask).logits), subject
    base = _json(_base_mmlu(work))
    other = tmp_path / "other_base_mmlu.json"
    other.write_text(json.dumps({**base, "details": {**base["details"],
                                                     "text_weight_hash": "0" * 64}}))
    fresh = eval_mmlu.main(["--config", str(work / "config.yaml"), "--run", run, "--model",
                            str(model_dir), "--base-result", str(other), "--data",
                            str(R / "world" / "mmlu"), "--out", str(tmp_path / "mmlu.json")])
    assert "reused_from" not in fresh["details"]
    assert (fresh["value"], fresh["n"]) == (base["value"], base["n"])


@pytest.mark.slow
def test_every_trained_variant_is_an_mlflow_run_with_its_config_and_metric_histories(table1):
    """The MLflow store of the tiny run, queried: experiment table1 holds one finished run per
    variant, with the resolved config as params, the train log's losses by step, and every
    metric file of the evaluated step at that step."""
    from mlflow.tracking import MlflowClient

    work, _ = table1
    R = _results(work)
    client = MlflowClient(tracking_uri=f"sqlite:///{R / 'mlruns.db'}")
    experiment = client.get_experiment_by_name("table1")
    assert experiment is not None
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == set(TRAINED)
    for name, run in runs.items():
        cfg = resolve_run(_raw_config(work), name)
        run_dir = R / "runs" / name
        assert run.info.run_id == (run_dir / "mlflow_run_id.txt").read_text().strip()
        assert run.info.status == "FINISHED", name
        assert run.data.tags["scale"] == "tiny"
        assert run.data.tags["variant"] == cfg.model.architecture
        assert run.data.params["model.architecture"] == cfg.model.architecture
        assert run.data.params["training.steps"] == str(STEP)
        assert run.data.params["training.t2i_ratio"] == str(cfg.training.t2i_ratio)
        log = read_jsonl(run_dir / "train_log.jsonl")
        for key in ("loss", "dm_loss", "lr"):
            history = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
            assert [(m.step, m.value) for m in history] == [
                (row["step"], pytest.approx(row[key])) for row in log], (name, key)
        step_dir = R / "metrics" / name / str(STEP)
        # beside a metric that reads user data lies its skip report (xfusion.data.report_path):
        # no metric, and empty in a clean run
        for report in step_dir.glob("*.bad_inputs.json"):
            assert _json(report)["n_bad"] == 0, report
        metric_files = sorted(p for p in step_dir.glob("*.json")
                              if not p.name.endswith(".bad_inputs.json"))
        assert {p.stem for p in metric_files} >= set(TABLE_FILES), name
        for path in metric_files:
            record = _json(path)
            history = client.get_metric_history(run.info.run_id, record["metric"])
            assert [(m.step, m.value) for m in history] == [
                (STEP, pytest.approx(record["value"]))], (name, path.name)
