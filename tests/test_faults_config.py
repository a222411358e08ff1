"""Malformed configs, each a clear error before any job: `snakemake -n` on a broken copy of
config/tiny.yaml exits non-zero, names the offending key, and writes nothing under results_dir.

The dry runs are started together (each is a Snakefile parse, a few seconds) and bounded by
one deadline."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from xfusion.config import ConfigError, apply_overrides, config_schema, experiments_from_dict
from xfusion.config import load_yaml
from xfusion.config_check import check_config

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).with_name("snakemake")  # the environment running the tests
DEADLINE_S = 150
VALID = "valid"  # the control: the config unbroken


def _drop(key):
    def edit(raw):
        del raw[key]
    return edit


def _runs(experiment, runs):
    def edit(raw):
        raw["experiments"][experiment]["runs"].update(runs)
    return edit


def _run_set(experiment, run, overrides):
    """More overrides for one run of one experiment (a new run where `run` is not declared)."""
    def edit(raw):
        runs = raw["experiments"][experiment]["runs"]
        runs[run] = {**(runs.get(run) or {}), **overrides}
    return edit


def _set(overrides):
    def edit(raw):
        raw.update(apply_overrides(raw, overrides))
    return edit


# name: (edit of the parsed tiny config, text the error must contain: the offending key)
CASES = {
    "unknown_architecture": (_set({"model.architecture": "triple_tower"}), "model.architecture"),
    "t2i_ratio_above_one": (_set({"training.t2i_ratio": 1.4}), "training.t2i_ratio"),
    "negative_steps": (_set({"training.steps": -5}), "training.steps"),
    "missing_results_dir": (_drop("results_dir"), "results_dir"),
    "eval_step_beyond_steps": (_set({"training.eval_steps": [200, 99999]}), "training.eval_steps"),
    "unknown_key": (_set({"training.learning_rate": 0.1}), "training.learning_rate"),
    "wrong_type": (_set({"training.steps": "many"}), "training.steps"),
    "image_size_not_divisible": (_set({"data.image_size": 30}), "data.image_size"),
    "run_override_bad_key": (_runs("table1", {"gated_tower": {"model.architecure": "gated_tower"}}),
                             "architecure"),
    "run_name_two_meanings": (_runs("figure5", {"dual_tower": {"training.t2i_ratio": 0.5}}),
                              "dual_tower"),
    # references, resolved before any job (xfusion.config_check)
    "missing_base_lm_path": (_set({"model.base_lm.source": "pretrained",
                                   "model.base_lm.path": "/nonexistent/llama-3.2-1b"}),
                             "config.model.base_lm.path = '/nonexistent/llama-3.2-1b'"),
    "repa_layer_beyond_depth": (_run_set("figureB", "size_s_align_on", {"model.repa.layer": 9}),
                                "config.experiments.figureB.runs.size_s_align_on -> "
                                "config.model.repa.layer = 9"),
    "unknown_evaluator": (_set({"evaluation.fid_extractor": "inception-v4"}),
                          "config.evaluation.fid_extractor = 'inception-v4'"),
    "probe_layer_beyond_depth_in_run": (_run_set("figureD", "probe_deep",
                                                 {"evaluation.probe_layers": [1, 2, 9]}),
                                        "config.experiments.figureD.runs.probe_deep -> "
                                        "config.evaluation.probe_layers = [1, 2, 9]"),
}


@pytest.fixture(scope="module")
def dry_runs(tmp_path_factory) -> dict:
    """Start every broken config's `snakemake -n` at once; collect (returncode, output, R)."""
    if not SNAKEMAKE.exists():
        pytest.fail(f"{SNAKEMAKE}: no snakemake beside {sys.executable}; install the test "
                    "environment (pip install -e '.[test]', or make setup)")
    root = tmp_path_factory.mktemp("broken_configs")
    base = load_yaml(REPO / "config" / "tiny.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    procs = {}
    for name, (edit, _) in {**CASES, VALID: (lambda raw: None, "")}.items():
        raw = copy.deepcopy(base)
        R = root / name / "results"
        raw["results_dir"] = str(R)  # absolute: a config that got through would write here
        edit(raw)
        config = root / name / "config.yaml"
        config.parent.mkdir()
        config.write_text(yaml.safe_dump(raw, sort_keys=False))
        procs[name] = (subprocess.Popen(
            [str(SNAKEMAKE), "-n", "--cores", "1", "results/table1.csv", "--configfile",
             str(config)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True), R)
    deadline = time.monotonic() + DEADLINE_S
    out = {}
    for name, (proc, R) in procs.items():
        try:
            text, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p, _ in procs.values():
                p.kill()
            pytest.fail(f"snakemake -n did not finish within {DEADLINE_S} s ({name})")
        out[name] = (proc.returncode, text, R)
    return out


def test_the_valid_config_passes_the_same_dry_run(dry_runs):
    """The control, run beside the broken ones: the unbroken config (with a tmp results_dir) is
    accepted, so the failures below come from the edits."""
    returncode, output, _ = dry_runs[VALID]
    assert returncode == 0, output[-2000:]


@pytest.mark.parametrize("name", list(CASES))
def test_malformed_config_stops_before_any_job_naming_the_key(name, dry_runs):
    returncode, output, R = dry_runs[name]
    key = CASES[name][1]
    assert returncode != 0, f"{name}: snakemake -n accepted it\n{output[-2000:]}"
    assert key in output, f"{name}: the error does not name {key!r}\n{output[-2000:]}"
    assert "Traceback" not in output, f"{name}: a traceback, not a clear error\n{output[-2000:]}"
    assert "Job stats" not in output and "rule " not in output  # no job was planned
    assert not R.exists(), f"{name}: {R} was written"


# ---- references, checked in-process (xfusion.config_check, what the dry runs above call) -------

SCHEMA = config_schema(REPO / "workflow" / "schemas" / "config.schema.yaml")


def _problems(raw) -> str:
    with pytest.raises(ConfigError) as err:
        check_config(raw, SCHEMA)
    return str(err.value)


@pytest.mark.parametrize("overrides, expected", [
    ({"evaluation.mmlu_path": "/nonexistent/mmlu"},
     "config.evaluation.mmlu_path = '/nonexistent/mmlu': no such directory"),
    ({"evaluation.itm_model": "bad id!"},
     "config.evaluation.itm_model = 'bad id!': neither an existing local path nor a hub id"),
    ({"evaluation.clip_model": "judge_itm"},
     "config.evaluation.clip_model = 'judge_itm': not a model of the pipeline this key can name; "
     "use judge_clip"),
    ({"evaluation.bertscore_model": "judge_clpi"},
     "config.evaluation.bertscore_model = 'judge_clpi': not a model of the pipeline this key"),
    ({"model.repa.enabled": True, "model.repa.encoder": "align_encodr"},
     "config.model.repa.encoder = 'align_encodr': not a model of the pipeline this key can name; "
     "use align_encoder or judge_clip"),
    ({"model.base_lm.source": "pretrained", "model.base_lm.path": "org/llama-not-cached"},
     "config.model.base_lm.path = 'org/llama-not-cached': a hub id not in the local Hugging Face "
     "cache"),
    ({"data.probe.val_dir": "/nonexistent/imagenet/val"},
     "config.data.probe.val_dir = '/nonexistent/imagenet/val': no such directory"),
])
def test_a_bad_reference_names_its_key_and_value(overrides, expected):
    assert expected in _problems(apply_overrides(load_yaml(REPO / "config" / "tiny.yaml"),
                                                 overrides))


def test_layers_are_checked_against_a_local_base_llms_config(tmp_path):
    """A local HF model directory: its depth comes from config.json (AutoConfig), no weights."""
    from transformers import LlamaConfig

    LlamaConfig(num_hidden_layers=6).save_pretrained(tmp_path / "llama")
    raw = apply_overrides(load_yaml(REPO / "config" / "tiny.yaml"),
                          {"model.base_lm.source": "pretrained",
                           "model.base_lm.path": str(tmp_path / "llama")})
    assert check_config(raw, SCHEMA)  # repa.layer 2 and probe layers 1-4 fit 6 layers
    _run_set("figureB", "size_s_align_on", {"model.repa.layer": 7})(raw)
    # the run's seed replicates carry its overrides, so the same problem: one line names them
    first, *others = experiments_from_dict(raw)["figureB"].groups["size_s_align_on"]
    assert first == "size_s_align_on" and len(others) == raw["seeds"] - 1
    assert _problems(raw) == (
        "config.experiments.figureB.runs.size_s_align_on -> config.model.repa.layer = 7: the base "
        "LLM (model.base_lm.path: tiny_s) has 6 layers; each index must be in [1, 6]"
        f" (the same in runs {', '.join(others)})")


def test_offline_a_hub_id_must_be_in_the_local_cache(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1: a hub id missing from the cache fails at parse time, naming the key
    and the offline mode; once a snapshot of it is in the cache, the config passes."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    raw = apply_overrides(load_yaml(REPO / "config" / "tiny.yaml"),
                          {"evaluation.clip_model": "openai/clip-vit-base-patch32"})
    problems = _problems(raw)
    assert problems.startswith("config.evaluation.clip_model = 'openai/clip-vit-base-patch32': "
                               "a hub id, but HF_HUB_OFFLINE=1 and it is not in the local")
    assert problems.count("\n") == 0  # the recipe's problem, not repeated for each run
    (tmp_path / "models--openai--clip-vit-base-patch32" / "snapshots" / "abc").mkdir(parents=True)
    assert check_config(raw, SCHEMA)


def test_layers_are_checked_against_a_cached_hub_models_config(tmp_path, monkeypatch,
                                                                hub_model_config):
    """A hub id: the depth comes from the cached config.json, offline too; a run override's
    probe layer beyond it names the run, the key and the base LLM."""
    from huggingface_hub import constants

    hub_model_config(tmp_path, "org/llama-6", 6)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    raw = apply_overrides(load_yaml(REPO / "config" / "tiny.yaml"),
                          {"model.base_lm.source": "pretrained",
                           "model.base_lm.path": "org/llama-6"})
    assert check_config(raw, SCHEMA)
    _run_set("figureD", "probe_deep", {"evaluation.probe_layers": [1, 7]})(raw)
    _, *replicates = experiments_from_dict(raw)["figureD"].groups["probe_deep"]
    assert _problems(raw) == (
        "config.experiments.figureD.runs.probe_deep -> config.evaluation.probe_layers = [1, 7]: "
        "the base LLM (model.base_lm.path: tiny_base) has 6 layers; each index must be in [1, 6]"
        f" (the same in runs {', '.join(replicates)})")


def test_a_local_vae_needs_its_subfolder(tmp_path):
    (tmp_path / "sd15" / "vae").mkdir(parents=True)
    raw = apply_overrides(load_yaml(REPO / "config" / "tiny.yaml"),
                          {"model.codec.kind": "autoencoder_kl",
                           "model.codec.path": str(tmp_path / "sd15"),
                           "model.codec.subfolder": "vea"})
    assert _problems(raw).startswith("config.model.codec.subfolder = 'vea': no such directory")
    raw["model"]["codec"]["subfolder"] = "vae"
    assert check_config(raw, SCHEMA)


def test_a_problem_runs_share_is_one_line_naming_each_run():
    """An unreadable base LLM config blocks the REPA check of the three align_on runs of
    Supp. Fig. B: one line, naming all three, not three copies."""
    raw = apply_overrides(load_yaml(REPO / "config" / "tiny.yaml"),
                          {"model.base_lm.source": "pretrained",
                           "model.base_lm.path": "org/llama-not-cached"})
    repa = [line for line in _problems(raw).splitlines() if "check model.repa.layer" in line]
    assert len(repa) == 1
    assert all(f"size_{size}_align_on" in repa[0] for size in "sml")


def test_the_paper_probe_needs_its_image_folders_where_a_probe_is_measured(paper_config,
                                                                          monkeypatch):
    """At paper scale null means no probe images (the world's set exists only at tiny scale);
    a config without a probe experiment needs none."""
    from huggingface_hub import constants

    from xfusion.config_check import pretrained_depth

    raw, env = paper_config
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", env["HF_HUB_CACHE"])  # the base LLMs' depths
    pretrained_depth.cache_clear()
    assert check_config(raw, SCHEMA)  # the stand-in ImageNet folders exist
    raw["data"]["probe"]["train_dir"] = None
    assert ("config.data.probe.train_dir = None: an experiment measures the linear probe and "
            "data.source is 'folder'") in _problems(raw)
    del raw["experiments"]["figureD"]
    assert check_config(raw, SCHEMA)
    pretrained_depth.cache_clear()  # depths read from this test's cache only
