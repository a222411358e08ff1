"""Experiment tracking with MLflow: the only module that imports it.

One MLflow experiment per ablation group (`table1`, `figure5`, …), one MLflow run per trained
variant and recipe. The run id is kept in `R/runs/RUN/mlflow_run_id.txt`, so a resumed training
and the later evaluation rules log into the same run. An MLflow run lives in one experiment (the
first group declaring it); tags `xfusion.experiment.<group>` = 1 (and `xfusion.experiments`, the
list) make a run shared by several figures findable from each of them, `xfusion.group` names the
declared run whose seed replicate it is (`dual_tower` for `dual_tower_seed1`, and for itself;
xfusion.config.seed_replicates), and `xfusion.recipe` is its recipe hash (xfusion.config.train_recipe). A run whose recipe changed is kept, tagged
`xfusion.superseded` = 1 (`xfusion.superseded_by`: the new hash, `xfusion.superseded_to`: where
its files went), and the new recipe gets a new MLflow run.

Store: `MLFLOW_TRACKING_URI` when set (a tracking server on a cluster), else an offline SQLite
store beside the runs, `sqlite:///R/mlruns.db` with artifacts under `R/mlartifacts/` (R is the
run directory's grandparent, `results/<scale>`), so tiny and paper runs never share experiments.

Tracking never stops training: if the store is unreachable or unwritable, a single warning says so
and the run goes on without it (the train log in `train_log.jsonl` stays complete).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any, Mapping

from xfusion.config import experiments_using, run_groups
from xfusion.io import atomic_write_text

RUN_ID_FILE = "mlflow_run_id.txt"
_BATCH = 100  # MLflow's log_batch accepts at most 100 params per call

# A dead tracking server must not stall training for minutes of exponential back-off.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def results_root(run_dir: str | Path) -> Path:
    """`R` for a run directory `R/runs/RUN`."""
    return Path(run_dir).resolve().parent.parent


def tracking_uri(run_dir: str | Path) -> str:
    default = f"sqlite:///{results_root(run_dir) / 'mlruns.db'}"
    return os.environ.get("MLFLOW_TRACKING_URI") or default


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """`{"training": {"lr": 1e-3}}` -> `{"training.lr": "0.001"}` (MLflow params are strings)."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


@contextlib.contextmanager
def store_lock(uri: str):
    """Exclusive access to a local SQLite store while it is opened.

    MLflow creates a new store's tables on first use, without a lock of its own: two jobs that
    start at once (parallel train jobs on a fresh results dir) would both run the migrations and
    one would fail ("table ... already exists"). A server store needs no lock."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class Tracker:
    """Logs one run's params, metrics and artifacts; a no-op after the first store failure.

    Args:
        run_dir: `R/runs/RUN` (holds `mlflow_run_id.txt`).
        experiment: MLflow experiment name (the ablation group).
        run_name: the variant's name.
        enabled: False on ranks other than 0 (one writer per run).
    """

    def __init__(self, run_dir: str | Path, experiment: str, run_name: str, enabled: bool = True):
        self.run_dir = Path(run_dir)
        self.uri = tracking_uri(run_dir)
        self.run_id: str | None = None
        self._client = None
        self._enabled = enabled
        self._call(self._open, experiment, run_name)

    def _warn(self, err: BaseException) -> None:
        warnings.warn(f"MLflow tracking disabled for this run ({self.uri}): "
                      f"{type(err).__name__}: {err}. Training goes on; metrics stay in "
                      f"{self.run_dir / 'train_log.jsonl'}.", RuntimeWarning, stacklevel=3)
        self._enabled = False

    def _call(self, fn, *args, **kwargs) -> Any:
        if not self._enabled:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # any store failure: warn once, never stop training
            self._warn(err)
            return None

    def _open(self, experiment: str, run_name: str) -> None:
        # MLflow logs store migrations at INFO on first use; keep the training output readable.
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        # Imported here, inside the guarded call: a broken MLflow install disables tracking
        # with the one warning instead of stopping training at import.
        from mlflow.tracking import MlflowClient

        id_file = self.run_dir / RUN_ID_FILE
        with store_lock(self.uri):  # opening a new store creates its tables
            client = MlflowClient(self.uri)
            if id_file.is_file():  # resume, or eval logging into the training run
                self.run_id = id_file.read_text().strip()
                client.get_run(self.run_id)  # fails clearly if the store lost it
            else:
                exp_id = self._experiment_id(client, experiment)
                tags = {"run": run_name}
                commit = git_commit()
                if commit:
                    tags["mlflow.source.git.commit"] = commit
                self.run_id = client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id
                atomic_write_text(id_file, self.run_id + "\n")
        self._client = client

    def _experiment_id(self, client, name: str) -> str:
        from mlflow.exceptions import MlflowException

        exp = client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        # A local store keeps artifacts beside the db; a server decides for itself.
        artifacts = (None if "MLFLOW_TRACKING_URI" in os.environ
                     else (results_root(self.run_dir) / "mlartifacts" / name).as_uri())
        try:
            return client.create_experiment(name, artifact_location=artifacts)
        except MlflowException:  # created meanwhile by a parallel run of the same group
            return client.get_experiment_by_name(name).experiment_id

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self._call(lambda: self._client.log_batch(
            self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()]))

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Params are write-once in MLflow: a resumed run re-logs identical values, which MLflow
        accepts; changed values would raise, which is the wanted refusal (the warning names it)."""
        from mlflow.entities import Param

        items = [Param(k, str(v)) for k, v in params.items()]
        for i in range(0, len(items), _BATCH):
            self._call(lambda chunk=items[i:i + _BATCH]: self._client.log_batch(
                self.run_id, params=chunk))

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, int(step)) for k, v in metrics.items() if v is not None]
        self._call(lambda: self._client.log_batch(self.run_id, metrics=batch))

    def log_text(self, text: str, artifact_file: str) -> None:
        self._call(lambda: self._client.log_text(self.run_id, text, artifact_file))

    def log_image(self, image, artifact_file: str) -> None:
        """A PIL image as an artifact of the run (a sample grid)."""
        self._call(lambda: self._client.log_image(self.run_id, image, artifact_file))

    def finish(self, status: str = "FINISHED") -> None:
        self._call(lambda: self._client.set_terminated(self.run_id, status=status))


def experiment_of(raw_config: Mapping[str, Any], run_name: str) -> str:
    """The first ablation group (config.experiments, in file order) that declares `run_name`."""
    return (experiments_using(raw_config, run_name) or ["default"])[0]


def experiment_tags(raw_config: Mapping[str, Any], run_name: str) -> dict[str, str]:
    """Tags naming every ablation group that declares `run_name`: filter on
    `tags."xfusion.experiment.figure5" = '1'` across experiments to find all of a figure's runs."""
    names = experiments_using(raw_config, run_name)
    # A seed replicate (<run>_seed<k>) is a run of its own, grouped with its run's other seeds.
    group = run_groups(raw_config).get(run_name, run_name)
    return {"xfusion.experiments": ",".join(names), "xfusion.group": group,
            **{f"xfusion.experiment.{name}": "1" for name in names}}


def start_run(run_dir: str | Path, run_cfg, experiment: str, enabled: bool = True) -> Tracker:
    """Open (or reopen) the MLflow run of a trained variant and log its resolved config."""
    tracker = Tracker(run_dir, experiment, run_cfg.name, enabled=enabled)
    tracker.set_tags({"scale": run_cfg.scale, "variant": run_cfg.model.architecture})
    tracker.log_params(flatten(run_cfg.to_dict()))
    tracker.log_text(run_cfg.to_json(), "config.json")
    return tracker


def trained_run(run_dir: str | Path, what: str) -> Tracker | None:
    """The MLflow run of a trained variant (its id in `run_dir/mlflow_run_id.txt`), or None with
    a warning that `what` is not logged."""
    run_dir = Path(run_dir)
    if not (run_dir / RUN_ID_FILE).is_file():
        warnings.warn(f"{run_dir / RUN_ID_FILE} missing: {what} not logged to MLflow",
                      RuntimeWarning, stacklevel=3)
        return None
    return Tracker(run_dir, experiment="", run_name=run_dir.name)


def log_metrics(run_dir: str | Path, metrics: Mapping[str, float], step: int | None) -> None:
    """Log metrics into a trained run (eval rules call this with the step they measured)."""
    if (tracker := trained_run(run_dir, "metrics")) is not None:
        tracker.log_metrics(metrics, step or 0)


def log_image(run_dir: str | Path, image, artifact_file: str) -> None:
    """Log a PIL image into a trained run (the T2I sampler's grid of each evaluated step)."""
    if (tracker := trained_run(run_dir, artifact_file)) is not None:
        tracker.log_image(image, artifact_file)


def mark_superseded(run_dir: str | Path, new_recipe: str, moved_to: str | Path) -> None:
    """Tag a trained run's MLflow run as superseded by another recipe (kept, not deleted)."""
    if (tracker := trained_run(run_dir, "the superseded tag")) is not None:
        tracker.set_tags({"xfusion.superseded": "1", "xfusion.superseded_by": new_recipe,
                          "xfusion.superseded_to": str(moved_to)})
