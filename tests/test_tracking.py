"""MLflow tracking: experiment per group, run per variant, reopened by id; failures warn once."""

import warnings
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from xfusion import tracking
from xfusion.config import load_run, load_yaml

CONFIG = Path(__file__).resolve().parents[1] / "config" / "tiny.yaml"


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path / "tiny" / "runs" / "dual_tower"


def test_flatten_gives_dotted_string_params():
    assert tracking.flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None}) == {
        "a.b": "1", "a.c.d": "[1, 2]", "e": "None"}


def test_experiment_of_is_first_group_declaring_the_run():
    raw = load_yaml(CONFIG)
    assert tracking.experiment_of(raw, "dual_tower") == "table1"
    assert tracking.experiment_of(raw, "noise_25") == "figure6"


def test_a_seed_replicate_is_tagged_with_its_run_and_its_experiments():
    raw = load_yaml(CONFIG)
    tags = tracking.experiment_tags(raw, "noise_50_seed2")
    assert tags["xfusion.group"] == "noise_50"
    assert tags["xfusion.experiments"] == "figure6,figureD"  # like noise_50 itself
    assert tracking.experiment_tags(raw, "noise_50")["xfusion.group"] == "noise_50"


def test_run_is_listed_with_params_metrics_and_reopened_by_id(run_dir):
    cfg = load_run(CONFIG, "dual_tower")
    tracker = tracking.start_run(run_dir, cfg, "table1")
    tracker.log_metrics({"loss": 2.0, "lr": 1e-3}, step=1)
    tracker.log_metrics({"loss": 1.5, "lr": 1e-3}, step=2)
    tracker.finish()
    run_id = (run_dir / tracking.RUN_ID_FILE).read_text().strip()
    assert tracking.tracking_uri(run_dir) == f"sqlite:///{run_dir.parent.parent / 'mlruns.db'}"

    # A later process (resume or eval) logs into the same run.
    tracking.log_metrics(run_dir, {"fid": 40.0}, step=2)

    client = MlflowClient(tracking.tracking_uri(run_dir))
    exp = client.get_experiment_by_name("table1")
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]
    run = runs[0]
    assert run.info.run_name == "dual_tower"
    assert run.data.tags["scale"] == "tiny"
    assert run.data.params["training.lr"] == str(cfg.training.lr)
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [
        (1, 2.0), (2, 1.5)]
    assert run.data.metrics["fid"] == 40.0
    assert client.list_artifacts(run_id)[0].path == "config.json"


def test_sample_grid_of_a_step_is_an_artifact_of_its_run(run_dir, tmp_path):
    from PIL import Image

    from xfusion import sample

    tracker = tracking.start_run(run_dir, load_run(CONFIG, "dual_tower"), "table1")
    tracker.finish()
    out = tmp_path / "samples" / "dual_tower" / "200" / "t2i"
    out.mkdir(parents=True)
    colours = [(220, 40, 40), (40, 80, 220), (40, 170, 60)]
    for i, colour in enumerate(colours):
        Image.new("RGB", (8, 8), colour).save(out / f"{i}.png")
    entries = [{"file": f"{i}.png"} for i in range(3)]
    sample.log_grid(out, run_dir / "steps" / "200", entries)
    client = MlflowClient(tracking.tracking_uri(run_dir))
    run_id = (run_dir / tracking.RUN_ID_FILE).read_text().strip()
    assert [a.path for a in client.list_artifacts(run_id, "samples")] == [
        "samples/step_200_t2i.png"]
    logged = Image.open(client.download_artifacts(run_id, "samples/step_200_t2i.png", str(tmp_path)))
    assert logged.convert("RGB").getpixel((96 + 48, 48)) == colours[1]  # second tile, centre
    assert Image.open(out.with_name("t2i_grid.png")).size == (4 * 96, 96)


def test_unwritable_store_warns_once_and_calls_become_noops(run_dir, tmp_path, monkeypatch):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{blocker}/mlruns.db")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker = tracking.start_run(run_dir, load_run(CONFIG, "dual_tower"), "table1")
        for step in range(3):
            tracker.log_metrics({"loss": 1.0}, step)
        tracker.finish()
    mlflow_warnings = [w for w in caught if "MLflow tracking disabled" in str(w.message)]
    assert len(mlflow_warnings) == 1


_OPEN_AT_ONCE = """
import sys, time, warnings
from xfusion import tracking
start = float(sys.argv[2])
time.sleep(max(0.0, start - time.time()))  # every process opens the fresh store together
with warnings.catch_warnings():
    # the tracking-disabled warning fails this process
    warnings.filterwarnings("error", message="MLflow tracking disabled", category=RuntimeWarning)
    tracker = tracking.Tracker(sys.argv[1], "table1", sys.argv[1].rsplit("/", 1)[-1])
tracker.log_metrics({"loss": 1.0}, step=1)
tracker.finish()
"""


def test_parallel_jobs_on_a_fresh_store_all_track(tmp_path, monkeypatch):
    """Train jobs that start together each get their run: the store's creation is serialised
    (unserialised, a second process died on 'table ... already exists' in the DAG test)."""
    import subprocess
    import sys
    import time

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    start = time.time() + 8  # after every interpreter has imported mlflow
    runs = [tmp_path / "tiny" / "runs" / f"variant_{i}" for i in range(4)]
    procs = [subprocess.Popen([sys.executable, "-c", _OPEN_AT_ONCE, str(r), str(start)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in runs]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, "\n".join(outputs)
    client = MlflowClient(f"sqlite:///{tmp_path / 'tiny' / 'mlruns.db'}")
    ids = {(r / tracking.RUN_ID_FILE).read_text().strip() for r in runs}
    assert len(ids) == 4
    assert all(client.get_metric_history(i, "loss")[0].value == 1.0 for i in ids)
