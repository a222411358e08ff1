"""eval.aggregate on synthetic metric JSONs (docs/INTERFACES.md schema): tables have the paper's
columns and rows, figures' CSVs carry what the plots need."""

import json
import math
import statistics
from pathlib import Path

import pandas as pd
import pytest
import yaml

from eval import aggregate
from xfusion.config import MEASURES, ConfigError, all_runs, experiments_from_dict, load_yaml
from xfusion.config import resolve_run, run_groups

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "config" / "tiny.yaml"
PAPER = ROOT / "config" / "paper.yaml"
REFERENCE = ROOT / "reference" / "paper_results.yaml"


def metric(path: Path, name: str, value: float, run=None, step=None, details=None) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"metric": name, "value": value, "run": run, "step": step, "n": 8,
                                "details": details or {}}))
    return str(path)


def seed_offset(exp, name: str) -> tuple[int, float]:
    """(index of the run's group in the experiment, the replicate's offset k - (n-1)/2): every
    metric below moves by the offset, so a group's mean is its seed-0 formula exactly."""
    for i, (group, members) in enumerate(exp.groups.items()):
        if name in members:
            return i, members.index(name) - (len(members) - 1) / 2
    raise KeyError(name)


def make_inputs(root: Path, experiment: str, attributes: bool = False, raw=None) -> dict:
    """Metric files, base result, train logs and caption metrics the way the DAG lays them out;
    with `attributes`, the tiny world's t2i_attr_acc / i2t_attr_recall files too. A run's seed
    replicates spread symmetrically around its value (seed_offset)."""
    raw = raw or load_yaml(CONFIG)
    exp = experiments_from_dict(raw)[experiment]
    out = {"metrics": [], "base": [], "train_logs": [], "caption_metrics": []}
    for name in exp.runs:
        i, k = seed_offset(exp, name)
        run = resolve_run(raw, name)
        for step in run.training.eval_steps:
            d = root / "metrics" / name / str(step)
            out["metrics"] += [metric(d / "fid.json", "fid", 30.0 - i - step / 100 + k, name, step),
                               metric(d / "clip.json", "clip", 20.0 + i + k, None, None),
                               metric(d / "blip.json", "blip", 40.0 + i + 2 * k, name, step),
                               metric(d / "mmlu.json", "mmlu", 0.25 + 0.01 * i, name, step)]
            per_layer = {mode: {str(l): 0.5 + 0.05 * l - 0.1 * run.training.i2t_noise_max
                                + 0.01 * k for l in run.evaluation.probe_layers}
                         for mode in ("understanding", "generation")}
            out["metrics"].append(metric(d / "probe.json", "probe", 0.6, name, step,
                                         {"per_layer": per_layer}))
            if attributes:
                out["metrics"] += [metric(d / "t2i_attr_acc.json", "t2i_attr_acc",
                                          0.5 + 0.1 * i, name, step),
                                   metric(d / "i2t_attr_recall.json", "i2t_attr_recall",
                                          0.4 + step / 1000, name, step)]
        log = root / "runs" / name / "train_log.jsonl"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("".join(json.dumps({"step": s, "loss": 1.0, "t2i_tokens_seen": 10 * s,
                                           "i2t_tokens_seen": 5 * s}) + "\n"
                               for s in range(0, run.training.steps + 1, 50)))
        out["train_logs"].append(f"{name}={log}")
    for base in ("tiny_base",):
        out["base"].append(f"{base}=" + metric(root / "metrics" / "base" / base / "mmlu.json",
                                               "mmlu", 0.3))
    out["caption_metrics"].append(metric(
        root / "metrics" / "caption_metrics.json", "caption_metrics", 0.0, details={
            "rows": {"long_detailed_caption": {"bertscore": 0.8, "clip": 28.0, "blip": 80.0},
                            "short_poor_caption": {"bertscore": 0.85, "clip": 27.0, "blip": 20.0}}}))
    return out


def wanted(paths: list[str], raw, experiment: str) -> list[str]:
    """The metric files the experiment declares (its metrics; at every step or the last)."""
    exp = experiments_from_dict(raw)[experiment]
    last = {name: max(resolve_run(raw, name).training.eval_steps) for name in exp.runs}
    return [p for p in paths if Path(p).stem in exp.metrics
            and (exp.steps == "every" or int(Path(p).parent.name) == last[Path(p).parent.parent.name])]


def run_aggregate(tmp_path: Path, experiment: str, attributes: bool = False,
                  config: Path = CONFIG) -> pd.DataFrame:
    """eval.aggregate on the files the DAG would give it (common.smk, aggregate_inputs)."""
    raw = load_yaml(config)
    inputs = make_inputs(tmp_path / "R", experiment, attributes, raw)
    inputs["metrics"] = wanted(inputs["metrics"], raw, experiment)
    out = tmp_path / f"{experiment}.csv"
    argv = ["--config", str(config), "--experiment", experiment, "--reference", str(REFERENCE),
            "--out", str(out)]
    for flag, values in (("--metrics", inputs["metrics"]), ("--base", inputs["base"]),
                         ("--train-logs", inputs["train_logs"]),
                         ("--caption-metrics", inputs["caption_metrics"])):
        argv += [flag, *values]
    aggregate.main(argv)
    return pd.read_csv(out)


def test_table1_has_base_row_four_architectures_and_paper_columns(tmp_path):
    table = run_aggregate(tmp_path, "table1")
    # the columns tiny.yaml declares: the paper's, the world's ground-truth metrics, the MMLU
    # change against the base LLM, each with its interval over seeds; paper_*
    measured = ["mmlu", "fid", "clip", "blip", "t2i_attr_acc", "i2t_attr_recall", "mmlu_change"]
    assert list(table.columns) == ["variant", "n_seeds",
                                   *(c for m in measured for c in (m, f"{m}_t95_low",
                                                                   f"{m}_t95_high")),
                                   "paper_mmlu", "paper_fid", "paper_clip", "paper_blip"]
    assert list(table.variant) == ["tiny_base", "single_tower", "gated_tower", "dual_projection",
                                   "dual_tower"]
    row = table.set_index("variant")
    assert row.loc["tiny_base", "mmlu"] == pytest.approx(30.0)  # fraction -> percent
    assert row.loc["tiny_base", "paper_mmlu"] == pytest.approx(32.2)  # the LLaMA3.2-1B row
    assert row.loc["dual_tower", "paper_fid"] == pytest.approx(14.20)
    assert row.loc["single_tower", "paper_mmlu"] == pytest.approx(25.0)
    # the last eval step's values: fid at the last step for run index 3
    last = resolve_run(load_yaml(CONFIG), "dual_tower").training.eval_steps[-1]
    assert row.loc["dual_tower", "fid"] == pytest.approx(30.0 - 3 - last / 100)
    assert row.loc["single_tower", "clip"] == pytest.approx(20.0)  # run/step from the path


T975_2 = 4.302653  # Student t, 97.5 % quantile, 2 degrees of freedom (3 seeds)


def test_a_runs_row_is_its_mean_over_seeds_with_a_t_interval(tmp_path):
    raw = load_yaml(CONFIG)
    assert experiments_from_dict(raw)["table1"].groups["dual_tower"] == (
        "dual_tower", "dual_tower_seed1", "dual_tower_seed2")
    row = run_aggregate(tmp_path, "table1").set_index("variant").loc["dual_tower"]
    last = resolve_run(raw, "dual_tower").training.eval_steps[-1]
    fids = [30.0 - 3 - last / 100 + k for k in (-1, 0, 1)]  # make_inputs' seeds
    half = T975_2 * statistics.stdev(fids) / math.sqrt(3)
    assert row.n_seeds == 3
    assert row.fid == pytest.approx(statistics.fmean(fids))
    assert (row.fid_t95_low, row.fid_t95_high) == pytest.approx((row.fid - half, row.fid + half),
                                                                rel=1e-5)
    blips = [40.0 + 3 + 2 * k for k in (-1, 0, 1)]
    assert row.blip_t95_high - row.blip == pytest.approx(  # the CSV keeps 6 digits
        T975_2 * statistics.stdev(blips) / math.sqrt(3), rel=1e-4)
    # the same MMLU from every seed: an interval of width zero; the change against the base too
    assert row.mmlu_t95_low == row.mmlu_t95_high == pytest.approx(row.mmlu)
    assert row.mmlu_change_t95_low == pytest.approx(row.mmlu - 30.0)


def with_seeds(tmp_path, seeds: int) -> Path:
    raw = dict(load_yaml(CONFIG), seeds=seeds)
    path = tmp_path / f"seeds{seeds}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_one_seed_gives_no_interval(tmp_path):
    table = run_aggregate(tmp_path, "table1", config=with_seeds(tmp_path, 1)).iloc[1:]
    assert (table.n_seeds == 1).all()
    assert table.fid.notna().all() and table.fid_t95_low.isna().all()
    assert table.fid_t95_high.isna().all() and table.mmlu_change_t95_low.isna().all()


def test_seeds_table_lists_each_seed_above_the_runs_mean(tmp_path):
    table = run_aggregate(tmp_path, "seeds")
    assert list(table.columns[:4]) == ["variant", "run", "seed", "n_seeds"]
    ours = table[table.variant == "dual_tower"]
    assert ours.run.tolist()[:3] == ["dual_tower", "dual_tower_seed1", "dual_tower_seed2"]
    assert ours.seed.tolist()[:3] == [0, 1, 2] and pd.isna(ours.seed.iloc[3])  # mean: no one seed
    assert pd.isna(ours.run.iloc[3]) and ours.n_seeds.tolist() == [1, 1, 1, 3]
    assert ours.fid.iloc[3] == pytest.approx(ours.fid.iloc[:3].mean())
    assert ours.fid_t95_low.iloc[:3].isna().all() and ours.fid_t95_low.iloc[3] < ours.fid.iloc[3]


def test_curves_are_means_over_seeds_per_step(tmp_path):
    frame = run_aggregate(tmp_path, "figure5")
    row = frame[(frame.run == "ratio_50_50")].sort_values("step").iloc[-1]
    step = resolve_run(load_yaml(CONFIG), "ratio_50_50").training.eval_steps[-1]
    assert row.n_seeds == 3 and row.fid == pytest.approx(30.0 - 2 - step / 100)
    assert row.fid_t95_high - row.fid == pytest.approx(T975_2 / math.sqrt(3), rel=1e-4)  # sd 1


def test_attribute_metrics_get_percent_columns_where_measured(tmp_path):
    table = run_aggregate(tmp_path, "table1", attributes=True)
    row = table.set_index("variant")
    assert row.loc["dual_tower", "t2i_attr_acc"] == pytest.approx(100 * (0.5 + 0.3))
    last = resolve_run(load_yaml(CONFIG), "dual_tower").training.eval_steps[-1]
    assert row.loc["dual_tower", "i2t_attr_recall"] == pytest.approx(100 * (0.4 + last / 1000))
    assert pd.isna(row.loc["tiny_base", "t2i_attr_acc"])  # the base LLM makes no images
    frame = run_aggregate(tmp_path / "f5", "figure5", attributes=True)
    assert {"t2i_attr_acc", "i2t_attr_recall"} <= set(frame) and frame.t2i_attr_acc.notna().all()
    lr = run_aggregate(tmp_path / "lr", "lr_ratio", attributes=True)
    assert "t2i_attr_acc" in lr and "i2t_attr_recall" in lr


def test_paper_scale_tables_have_no_attribute_columns(tmp_path):
    """Paper scale has no scene records: its config declares no attribute metric, so its tables
    and their inputs have none."""
    for experiment in ("table1", "lr_ratio", "figure5"):
        frame = run_aggregate(tmp_path / experiment, experiment, config=PAPER)
        assert not {"t2i_attr_acc", "i2t_attr_recall"} & set(frame), experiment
        assert {"fid", "blip"} <= set(frame)


def test_attribute_metric_without_scene_records_is_a_config_error():
    raw = load_yaml(PAPER)
    raw["experiments"]["table1"]["metrics"].append("t2i_attr_acc")
    with pytest.raises(ConfigError, match="experiments.table1.metrics = 't2i_attr_acc': needs "
                                          "the tiny world's scene records"):
        experiments_from_dict(raw)


def test_table_a_puts_our_final_model_below_published_rows_in_our_column_names(tmp_path):
    table = run_aggregate(tmp_path, "tableA")
    assert list(table.columns) == ["variant", "source", "base_lm", "n_seeds",
                                   *(c for m in ("mmlu", "blip", "fid")
                                     for c in (m, f"{m}_t95_low", f"{m}_t95_high"))]
    assert list(table.source) == ["paper"] * 13 + ["ours"]
    xfusion = table.set_index("variant").loc["X-Fusion"]  # reference coco_fid -> fid
    assert xfusion.fid == pytest.approx(11.5) and xfusion.blip == pytest.approx(80.0)
    assert xfusion.base_lm == "LLaMA-3.1 8B"
    ours = table[table.source == "ours"].iloc[0]
    assert ours.variant == "dual_tower" and ours.base_lm == "tiny_base"
    last = resolve_run(load_yaml(CONFIG), "dual_tower").training.eval_steps[-1]
    assert ours.fid == pytest.approx(30.0 - last / 100) and ours.mmlu == pytest.approx(25.0)


def test_lr_ratio_reports_mmlu_change_against_base(tmp_path):
    table = run_aggregate(tmp_path, "lr_ratio").set_index("variant")
    assert list(table.index) == ["tiny_base", "lr_ratio_0", "lr_ratio_0_1", "single_tower"]
    assert table.loc["lr_ratio_0_1", "lr_text_ratio"] == pytest.approx(0.1)
    assert table.loc["lr_ratio_0", "mmlu_change"] == pytest.approx(25.0 - 30.0)


def test_figure5_rows_per_run_and_step_with_tokens_seen(tmp_path):
    frame = run_aggregate(tmp_path, "figure5")
    runs = list(experiments_from_dict(load_yaml(CONFIG))["figure5"].groups)
    assert list(dict.fromkeys(frame.run)) == runs
    assert len(frame) == 2 * len(runs)  # one row per run and step: its seeds pooled
    assert {"fid", "clip", "blip", "t2i_ratio", "t2i_tokens_seen", "i2t_tokens_seen"} <= set(frame)
    assert (frame.t2i_tokens_seen == 10 * frame.step).all()


def test_figure_d_probe_per_layer_and_mode(tmp_path):
    frame = run_aggregate(tmp_path, "figureD")
    assert list(frame.columns) == ["run", "step", "i2t_noise_max", "mode", "layer", "n_seeds",
                                   "probe", "probe_t95_low", "probe_t95_high"]
    assert (frame.n_seeds == 3).all() and (frame.probe_t95_low < frame.probe).all()
    assert set(frame["mode"]) == {"understanding", "generation"}
    assert set(frame.layer) == {1, 2, 3, 4}
    clean = frame[frame.i2t_noise_max == 0].probe.mean()
    noisy = frame[frame.i2t_noise_max > 0].probe.mean()
    assert clean > noisy


def test_figure_e_paper_values_beside_ours(tmp_path):
    frame = run_aggregate(tmp_path, "figureE").set_index(["caption", "metric"])
    assert frame.loc[("short_poor_caption", "blip"), "paper"] == pytest.approx(10.4)
    assert frame.loc[("short_poor_caption", "blip"), "ours"] == pytest.approx(20.0)


def test_every_configured_experiment_aggregates(tmp_path):
    for experiment in experiments_from_dict(load_yaml(CONFIG)):
        assert not run_aggregate(tmp_path / experiment, experiment).empty, experiment


def test_unknown_metric_file_is_refused(tmp_path):
    bad = metric(tmp_path / "metrics" / "dual_tower" / "400" / "bleu.json", "bleu", 1.0)
    with pytest.raises(SystemExit, match="unknown metric file"):
        aggregate.read_metrics([bad])


def test_a_metric_named_otherwise_in_its_json_is_refused(tmp_path):
    """One name per metric: the file blip.json must say metric "blip" (not blip_itm, itm)."""
    bad = metric(tmp_path / "metrics" / "dual_tower" / "400" / "blip.json", "blip_itm", 30.0)
    with pytest.raises(SystemExit, match="metric 'blip_itm'.*one name"):
        aggregate.read_metrics([bad])


def test_metric_files_of_a_run_outside_the_experiment_are_refused(tmp_path):
    stray = metric(tmp_path / "metrics" / "noise_25" / "400" / "fid.json", "fid", 1.0)
    with pytest.raises(SystemExit, match="noise_25: not runs of config.experiments.table1"):
        aggregate.aggregate(load_yaml(CONFIG), "table1", load_yaml(REFERENCE), [stray])


def test_one_builder_per_measure():
    assert set(aggregate.BUILDERS) == set(MEASURES)


# ---- seed replicates (xfusion.config.seed_replicates) -------------------------------------------


def test_seed_replicates_are_named_by_seed_and_shared_between_experiments():
    """table1 with 3 seeds and tableA with 2 share dual_tower and dual_tower_seed1: each is one
    run (trained once), with the recipe's overrides plus its training seed."""
    raw = load_yaml(CONFIG)
    raw["experiments"]["tableA"]["seeds"] = 2
    exps = experiments_from_dict(raw)
    assert exps["tableA"].groups == {"dual_tower": ("dual_tower", "dual_tower_seed1")}
    runs = all_runs(raw)
    assert runs["dual_tower"] == {} and runs["dual_tower_seed2"] == {"training.seed": 2}
    assert runs["ratio_50_50_seed1"] == {"training.t2i_ratio": 0.5, "training.seed": 1}
    assert resolve_run(raw, "ratio_50_50_seed1").training.seed == 1
    assert run_groups(raw)["ratio_50_50_seed2"] == "ratio_50_50"


def test_a_runs_own_training_seed_starts_its_replicates():
    raw = load_yaml(CONFIG)
    raw["experiments"]["figure8"]["runs"]["x_fuse"]["training.seed"] = 5
    assert experiments_from_dict(raw)["figure8"].groups["x_fuse"] == (
        "x_fuse", "x_fuse_seed6", "x_fuse_seed7")


def test_a_run_named_like_another_runs_replicate_is_refused():
    raw = load_yaml(CONFIG)
    raw["experiments"]["figure8"]["runs"]["x_fuse_seed1"] = {"model.architecture": "dual_tower"}
    with pytest.raises(ConfigError, match="figure8.runs.x_fuse_seed1.*seed replicate of x_fuse"):
        experiments_from_dict(raw)
    raw = load_yaml(CONFIG)
    raw["seeds"] = 0
    with pytest.raises(ConfigError, match="config.seeds = 0: the number of training seeds"):
        experiments_from_dict(raw)
