# %% [markdown]
# # Browse training runs from MLflow
#
# Every trained variant is one MLflow run (`xfusion.tracking`): params from the resolved config,
# training losses by step, and the eval rules' metrics at each eval step. This notebook lists the
# runs and redraws one figure from MLflow alone (default: X-Fusion Fig. 6, the metrics of its
# runs over training steps), as a cross-check of `results/figures/`.
#
# Store: `MLFLOW_TRACKING_URI` if set, else the tiny-scale store `results/tiny/mlruns.db`.
# `FIGURE` picks another experiment of the config; `BROWSE_RUNS_OUT` saves the figure to a file.
# The same code lives in `notebooks/browse_runs.py` (a plain script with `# %%` cells).

# %%
import os
from pathlib import Path

import matplotlib.pyplot as plt
import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient

from xfusion.config import experiments_from_dict, load_yaml

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
# The runs of the chosen experiment are named in the config (a run shared by several experiments
# is logged once, in the MLflow experiment of the first that declares it).

# %%
wanted = list(experiments_from_dict(load_yaml(CONFIG))[FIGURE].runs)
chosen = runs[runs["run"].isin(wanted)]
EVAL_METRICS = ["fid", "clip", "clip_score", "blip", "blip_itm", "itm", "loss"]
history = pd.DataFrame([
    {"run": row.run, "metric": key, "step": m.step, "value": m.value}
    for row in chosen.itertuples()
    for key in EVAL_METRICS if f"metrics.{key}" in chosen.columns
    for m in client.get_metric_history(row.run_id, key)])
shown = [k for k in EVAL_METRICS if not history.empty and k in set(history["metric"])]
fig, axes = plt.subplots(1, max(len(shown), 1), figsize=(4.2 * max(len(shown), 1), 3.4), squeeze=False)
for ax, key in zip(axes[0], shown):
    for run, part in history[history["metric"] == key].groupby("run"):
        ax.plot(part["step"], part["value"], marker="o", label=run)
    ax.set_xlabel("training step")
    ax.set_title(key)
    ax.grid(alpha=0.3)
axes[0][-1].legend(fontsize=8)
fig.suptitle(f"{FIGURE} from MLflow ({len(chosen)} of {len(wanted)} runs found)", fontsize=10)
fig.tight_layout()
if os.environ.get("BROWSE_RUNS_OUT"):
    fig.savefig(os.environ["BROWSE_RUNS_OUT"])
