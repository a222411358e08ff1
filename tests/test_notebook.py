"""notebooks/browse_runs.ipynb runs top to bottom on a small MLflow store made here, and draws
the logged histories under the metrics' one names."""

from pathlib import Path

import nbformat
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]


OFFSETS = {"dual_tower": 0.0, "noise_25": 2.0}


def fid(run: str, step: int) -> float:
    return 30.0 + OFFSETS[run] - step / 100


def make_store(uri: str) -> None:
    """Two runs of Fig. 6 (one in table1's MLflow experiment, as xfusion.tracking files it), with
    the keys eval.* log (xfusion.config.METRICS names), and a stray old-style key."""
    client = MlflowClient(uri)
    for experiment, run in (("table1", "dual_tower"), ("figure6", "noise_25")):
        exp_id = client.create_experiment(experiment)
        run_id = client.create_run(exp_id, run_name=run).info.run_id
        for step in (100, 200, 300, 400):
            client.log_metric(run_id, "loss", 2.0 - step / 400, step=step)
        for step in (400, 200):  # logged out of order: the figure still draws by step
            client.log_metric(run_id, "fid", fid(run, step), step=step)
            client.log_metric(run_id, "blip", 40.0 - OFFSETS[run], step=step)
            client.log_metric(run_id, "blip_itm", -1.0, step=step)  # not a metric name
        client.set_terminated(run_id)


def test_browse_runs_notebook_redraws_a_figure_from_mlflow(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    make_store(uri)
    out = tmp_path / "figure6_from_mlflow.png"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("BROWSE_RUNS_OUT", str(out))
    monkeypatch.setenv("FIGURE", "figure6")
    nb = nbformat.read(ROOT / "notebooks" / "browse_runs.ipynb", as_version=4)
    NotebookClient(nb, timeout=180, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    assert out.stat().st_size > 5000
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert uri in text
    drawn = pd.read_csv(out.with_suffix(".csv"))  # the data behind the figure
    assert set(drawn.metric) == {"fid", "blip", "loss"}  # Fig. 6's metrics found, one name each
    assert set(drawn.run) == set(OFFSETS)
    for run in OFFSETS:
        mine = drawn[drawn.run == run].set_index(["metric", "step"]).value
        assert [mine["fid", s] for s in (200, 400)] == pytest.approx([fid(run, 200), fid(run, 400)])
        assert mine["blip", 400] == pytest.approx(40.0 - OFFSETS[run])
        assert mine.loc["loss"].to_dict() == pytest.approx(
            {s: 2.0 - s / 400 for s in (100, 200, 300, 400)})
