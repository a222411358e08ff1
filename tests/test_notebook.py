"""notebooks/browse_runs.ipynb runs top to bottom on a small MLflow store made here."""

from pathlib import Path

import nbformat
from mlflow.tracking import MlflowClient
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]


def make_store(uri: str) -> None:
    """Two runs of Fig. 6 (one in table1's MLflow experiment, as xfusion.tracking files it)."""
    client = MlflowClient(uri)
    for experiment, run, offset in (("table1", "dual_tower", 0.0), ("figure6", "noise_25", 2.0)):
        exp_id = client.create_experiment(experiment)
        run_id = client.create_run(exp_id, run_name=run).info.run_id
        for step in (100, 200, 300, 400):
            client.log_metric(run_id, "loss", 2.0 - step / 400, step=step)
        for step in (200, 400):
            client.log_metric(run_id, "fid", 30.0 + offset - step / 100, step=step)
            client.log_metric(run_id, "blip_itm", 40.0 - offset, step=step)
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
