"""The config schema: in step with xfusion.config (its registries' enums come from there), accepts
both scales, and a bad value stops Snakemake before any job with a message naming the dotted key."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from xfusion import config as xc

ROOT = Path(__file__).resolve().parents[1]
SCHEMA_PATH = ROOT / "workflow" / "schemas" / "config.schema.yaml"
SCHEMA = xc.config_schema(SCHEMA_PATH)
SNAKEMAKE = Path(sys.executable).with_name("snakemake")


def section_schemas():
    """(dotted name, dataclass, schema node) for every config section and subsection."""
    props = SCHEMA["properties"]
    yield from ((name, cls, props[name]) for name, cls in xc.SECTIONS.items())
    model = props["model"]["properties"]
    yield "model.base_lm", xc.BaseLMConfig, model["base_lm"]
    yield "model.base_lm.tiny", xc.TinyLlamaConfig, model["base_lm"]["properties"]["tiny"]
    yield "model.codec", xc.ImageCodecConfig, model["codec"]
    yield "model.repa", xc.RepaConfig, model["repa"]
    yield "model.repa.align", xc.AlignEncoderConfig, model["repa"]["properties"]["align"]
    yield "data.captioner", xc.CaptionerConfig, props["data"]["properties"]["captioner"]
    yield "data.probe", xc.ProbeDataConfig, props["data"]["properties"]["probe"]
    experiment = props["experiments"]["additionalProperties"]
    yield "experiments.<name>", xc.Experiment, experiment
    yield "experiments.<name>.paper", xc.PaperReference, experiment["properties"]["paper"]


def test_registry_enums_come_from_xfusion_config_only():
    """The YAML file names no architecture, metric or measure: the loaded schema gets them."""
    def enums(node):
        if isinstance(node, dict):
            yield from ([node["enum"]] if "enum" in node else [])
            for value in node.values():
                yield from enums(value)
        elif isinstance(node, list):
            for value in node:
                yield from enums(value)

    in_file = [v for enum in enums(yaml.safe_load(SCHEMA_PATH.read_text())) for v in enum]
    registered = {*xc.ARCHITECTURES, *xc.METRICS, *xc.MEASURES, *xc.STEPS, *xc.PAPER_LAYOUTS,
                  *xc.REPA_PROJECTORS}
    assert in_file and not registered & set(in_file)
    assert SCHEMA["$defs"]["architecture"]["enum"] == list(xc.ARCHITECTURES)
    assert SCHEMA["$defs"]["metric"]["enum"] == list(xc.METRICS)
    assert SCHEMA["$defs"]["measure"]["enum"] == list(xc.MEASURES)
    node = SCHEMA["properties"]["model"]["properties"]["architecture"]
    assert node == {"$ref": "#/$defs/architecture"}


@pytest.mark.parametrize("name,cls,node", list(section_schemas()), ids=lambda v: str(v)[:20])
def test_schema_keys_match_dataclass_fields(name, cls, node):
    fields = {f.name for f in dataclasses.fields(cls)}
    if cls is xc.Experiment:
        fields -= {"name", "groups"}  # the key of config.experiments; set from runs and seeds
    assert set(node["properties"]) == fields, f"config.{name}: schema and dataclass differ"
    assert node["additionalProperties"] is False
    assert set(node.get("required", [])) <= fields


@pytest.mark.parametrize("scale", ["tiny", "paper"])
def test_both_scales_validate(scale):
    raw = xc.load_yaml(ROOT / "config" / f"{scale}.yaml")
    jsonschema.Draft202012Validator(SCHEMA).validate(raw)


def dry_run(tmp_path, edit):
    """`snakemake -n` on a temp copy of the tiny config changed by `edit`."""
    raw = yaml.safe_load((ROOT / "config" / "tiny.yaml").read_text())
    raw["results_dir"] = str(tmp_path / "results" / "tiny")
    edit(raw)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    proc = subprocess.run([str(SNAKEMAKE), "-n", "results/table1.csv", "--configfile", str(path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stdout + proc.stderr


def assert_stopped(rc, output, *expected):
    assert rc != 0, output[-2000:]
    assert "stopped before any job" in output
    assert "Job stats" not in output and "rule train_run" not in output
    for text in expected:
        assert text in output, output[-2000:]


def test_unknown_architecture_stops_before_any_job(tmp_path):
    rc, out = dry_run(tmp_path, lambda c: c["model"].update(architecture="triple_tower"))
    assert_stopped(rc, out, "config.model.architecture = 'triple_tower'", "dual_tower")


def test_t2i_ratio_outside_unit_interval_stops(tmp_path):
    rc, out = dry_run(tmp_path, lambda c: c["training"].update(t2i_ratio=1.4))
    assert_stopped(rc, out, "config.training.t2i_ratio = 1.4", "maximum of 1")


def test_negative_steps_stops(tmp_path):
    rc, out = dry_run(tmp_path, lambda c: c["training"].update(steps=-5))
    assert_stopped(rc, out, "config.training.steps = -5")


def test_missing_required_key_stops(tmp_path):
    rc, out = dry_run(tmp_path, lambda c: c["training"].pop("eval_steps"))
    assert_stopped(rc, out, "config.training.eval_steps: missing required key")


def test_bad_run_override_names_the_experiment_and_key(tmp_path):
    def edit(c):
        c["experiments"]["figure6"]["runs"]["noise_25"]["training.i2t_noise_max"] = 2.5
    rc, out = dry_run(tmp_path, edit)
    assert_stopped(rc, out, "config.experiments.figure6.runs.noise_25",
                   "config.training.i2t_noise_max = 2.5")


def test_value_check_beyond_the_schema_stops(tmp_path):
    # eval steps past the last training step: caught by xfusion.config.validate
    rc, out = dry_run(tmp_path, lambda c: c["training"].update(eval_steps=[200, 4000]))
    assert_stopped(rc, out, "config.training.eval_steps")


def test_unknown_metric_of_an_experiment_stops_before_any_job(tmp_path):
    rc, out = dry_run(tmp_path, lambda c: c["experiments"]["table1"]["metrics"].append("itm"))
    assert_stopped(rc, out, "config.experiments.table1.metrics.6 = 'itm'", "blip")


def test_figure_facet_outside_its_settings_stops_before_any_job(tmp_path):
    rc, out = dry_run(tmp_path, lambda c: c["experiments"]["figureB"]["plot"].update(facet="seed"))
    assert_stopped(rc, out, "config.experiments.figureB.plot.facet = 'seed'",
                   "a column of the experiment's settings")
