# %% [markdown]
# # Browse training runs from MLflow
#
# Every trained variant is one MLflow run (`xfusion.tracking`): params from the resolved config,
# training losses by step, and the eval rules' metrics at each eval step. This notebook lists the
# runs and redraws one figure from MLflow alone (default: X-Fusion Fig. 6, the metrics of its
# runs over training steps), as a cross-check of `results/<scale>/figures/`.
#
# Store: `MLFLOW_TRACKING_URI` if set, else the tiny-scale store `results/tiny/mlruns.db`.
# `FIGURE` picks another experiment of the config; `BROWSE_RUNS_OUT` saves the figure to a file
# and the metric histories it draws beside it (same name, `.csv`).
# The same code lives in `notebooks/browse_runs.py` (a plain script with `# %%` cells).

# %%
import os
from pathlib import Path

import matplotlib.pyplot as plt
import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient

from xfusion.config import METRICS, experiments_from_dict, load_yaml

ROOT = Path.cwd() if (Path.cwd() / "Snakefile").exists() else Path.cwd().parent
CONFIG = os.environ.get("XFUSION_CONFIG", str(ROOT / "config" / "tiny.yaml"))
TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{ROOT / 'results' / 'tiny' / 'mlruns.db'}"
FIGURE = os.environ.get("FIGURE", "figure6")
client = MlflowClient(TRACKING_URI)
mlflow.set_tracking_uri(TRACKING_URI)
print("store:", TRACKING_URI)

# %% [markdown]
# ## All runs

# %%
runs = mlflow.search_runs(search_all_experiments=True)
experiments = {e.experiment_id: e.name for e in client.search_experiments()}
runs["experiment"] = runs["experiment_id"].map(experiments)
runs["run"] = runs["tags.mlflow.runName"]
metric_cols = [c for c in runs.columns if c.startswith("metrics.")]
runs[["experiment", "run", "status", *metric_cols]]

# %% [markdown]
# ## One figure, from MLflow only
# The runs and metrics of the chosen experiment are named in the config (a run shared by several
# experiments is logged once, in the MLflow experiment of the first that declares it). A metric
# has one name in its file, its table column and MLflow (`xfusion.config.METRICS`: fid, clip,
# blip, mmlu, probe, …); the training loss is `loss`. MLflow holds the metric files' values:
# MMLU, probe and attribute metrics as fractions.

# %%
experiment = experiments_from_dict(load_yaml(CONFIG))[FIGURE]
wanted = list(experiment.runs)
chosen = runs[runs["run"].isin(wanted)]
keys = [*experiment.metrics, "loss"]
history = pd.DataFrame([
    {"run": row.run, "metric": key, "step": m.step, "value": m.value}
    for row in chosen.itertuples()
    for key in keys if f"metrics.{key}" in chosen.columns
    for m in client.get_metric_history(row.run_id, key)], columns=["run", "metric", "step", "value"])
shown = [k for k in keys if k in set(history["metric"])]
fig, axes = plt.subplots(1, max(len(shown), 1), figsize=(4.2 * max(len(shown), 1), 3.4), squeeze=False)
for ax, key in zip(axes[0], shown):
    for run, part in history[history["metric"] == key].groupby("run"):
        part = part.sort_values("step")
        ax.plot(part["step"], part["value"], marker="o", label=run)
    ax.set_xlabel("training step")
    ax.set_title(METRICS[key].label if key in METRICS else key)
    ax.grid(alpha=0.3)
axes[0][-1].legend(fontsize=8)
fig.suptitle(f"{FIGURE} from MLflow ({len(chosen)} of {len(wanted)} runs found)", fontsize=10)
fig.tight_layout()
if os.environ.get("BROWSE_RUNS_OUT"):
    out = Path(os.environ["BROWSE_RUNS_OUT"])
    fig.savefig(out)
    history.to_csv(out.with_suffix(".csv"), index=False)  # the data the figure draws
