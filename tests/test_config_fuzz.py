"""config/tiny.yaml fuzzed: every mutation validates, or stops with a config error naming a key.

Hypothesis mutates the parsed tiny config, one to three mutations per example, at any depth and
inside experiments' run overrides too: a value replaced by one of another type, a number pushed
out of range, a key deleted, an unknown key added, a run override of a real or a misspelt key.
Each mutant goes through xfusion.config_check.check_config, what the Snakefile calls while it
parses (workflow/rules/common.smk): it returns the resolved runs, or raises a ConfigError every
line of which names a dotted key (`config.…`). Any other exception is a hole in the validation.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from xfusion.config import ARCHITECTURES, CAPTION_BACKENDS, IMAGE_CODECS, JUDGE_NAMES, MEASURES
from xfusion.config import METRICS, STEPS, ConfigError, config_schema, load_yaml
from xfusion.config_check import check_config

ROOT = Path(__file__).resolve().parents[1]
TINY = load_yaml(ROOT / "config" / "tiny.yaml")
SCHEMA = config_schema(ROOT / "workflow" / "schemas" / "config.schema.yaml")
NAMES_A_KEY = re.compile(r"\bconfig\.")
SECTIONS = ("model", "data", "training", "evaluation")


def _nodes(node, path=()):
    """Every (path, value) of the tree: mapping entries and list items, at every depth."""
    yield path, node
    items = node.items() if isinstance(node, dict) else (
        enumerate(node) if isinstance(node, list) else ())
    for key, child in items:
        yield from _nodes(child, (*path, key))


def _dotted_leaves(node, prefix=""):
    for key, value in node.items():
        if isinstance(value, dict) and key != "experiments":
            yield from _dotted_leaves(value, f"{prefix}{key}.")
        elif prefix:
            yield f"{prefix}{key}"


def _value(tree, parts):
    for part in parts:
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


# Keys a run may override: every leaf of the recipe's sections, plus two misspelt ones.
OVERRIDE_KEYS = sorted(_dotted_leaves({k: TINY[k] for k in SECTIONS})) + [
    "training.stpes", "model.repa.layers.deep", "model.repa.enabled.x"]

RECIPE_VALUES = {key: value for key, value in (
    (k, _value(TINY, k.split("."))) for k in OVERRIDE_KEYS) if value is not None}

# A value of any YAML type (YAML has no NaN literal that tiny.yaml's users write by accident,
# but `.nan` parses, so floats include it).
ANY_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(),
    st.text(max_size=12), st.lists(st.integers(-3, 20), max_size=3),
    st.dictionaries(st.text(max_size=6), st.integers(-3, 3), max_size=2))
OUT_OF_RANGE = st.one_of(st.sampled_from([-1, 0, -10**9, 10**9]),
                         st.floats(-1e9, 1e9, allow_nan=False))
# Strings a config value could plausibly hold: the registries' names, evaluator and source
# names, paths that do not exist, hub ids that are not cached, a misspelt judge.
NAMES = sorted({*ARCHITECTURES, *JUDGE_NAMES, *IMAGE_CODECS, *CAPTION_BACKENDS, *MEASURES,
                *STEPS, *METRICS, "pretrained", "tiny", "folder", "world", "bf16", "stop",
                "inception-v3-compat", "inception-v4", "judge_clpi", "/nonexistent/model",
                "./missing", "org/not-cached-model", "data/coco/train2017", "bad id!"})
# Kinds that keep the schema happy more often are drawn twice as often, so that a good share of
# mutants reaches the typed and the reference checks.
KINDS = ("retype", "out_of_range", "delete", "unknown_key", *("same_type", "run_override") * 2)


def _like(value):
    """Another value of `value`'s type, often within the schema's ranges: mutants that pass
    the schema and reach the typed checks and the reference checks."""
    if isinstance(value, bool):
        return st.booleans()
    if isinstance(value, int):
        return st.integers(-3, 40)
    if isinstance(value, float):
        return st.floats(-0.5, 1.5, allow_nan=False)
    if isinstance(value, str) or value is None:
        return st.one_of(st.sampled_from(NAMES), st.text(max_size=8))
    if isinstance(value, list):
        items = _like(value[0]) if value else st.integers(-3, 40)
        return st.lists(items, max_size=4)
    return ANY_VALUE


def _parent(raw, path):
    node = raw
    for key in path[:-1]:
        node = node[key]
    return node


@st.composite
def mutants(draw):
    """(a mutated deep copy of the tiny config, what was done to it)."""
    raw = copy.deepcopy(TINY)
    done = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(KINDS))
        nodes = [(p, v) for p, v in _nodes(raw) if p]
        if kind == "retype":
            path, _ = draw(st.sampled_from(nodes))
            _parent(raw, path)[path[-1]] = value = draw(ANY_VALUE)
        elif kind == "out_of_range":
            numbers = [p for p, v in nodes if type(v) in (int, float)]
            path = draw(st.sampled_from(numbers))
            _parent(raw, path)[path[-1]] = value = draw(OUT_OF_RANGE)
        elif kind == "same_type":
            path, old = draw(st.sampled_from(nodes))
            _parent(raw, path)[path[-1]] = value = draw(_like(old))
        elif kind == "delete":
            path, value = draw(st.sampled_from(nodes))
            del _parent(raw, path)[path[-1]]
        elif kind == "unknown_key":
            mappings = [p for p, v in _nodes(raw) if isinstance(v, dict)]
            parent = draw(st.sampled_from(mappings))
            path = (*parent, draw(st.text(min_size=1, max_size=8)))
            _parent(raw, path)[path[-1]] = value = draw(ANY_VALUE)
        else:
            runs = [p for p, v in nodes if len(p) == 4 and p[0] == "experiments"
                    and p[2] == "runs" and (v is None or isinstance(v, dict))]
            if not runs:
                continue
            run = draw(st.sampled_from(runs))
            key = draw(st.sampled_from(OVERRIDE_KEYS))
            value = draw(st.one_of(ANY_VALUE, _like(RECIPE_VALUES.get(key))))
            path = (*run, key)
            runs_of_experiment = _parent(raw, run)
            runs_of_experiment[run[-1]] = {**(runs_of_experiment[run[-1]] or {}), key: value}
        done.append((kind, ".".join(map(str, path)), value))
    return raw, done


def test_the_unmutated_tiny_config_validates():
    """The control: what the fuzz mutates is valid, so its errors come from the mutations."""
    assert set(check_config(TINY, SCHEMA)) >= {"dual_tower", "single_tower", "noise_50"}


@settings(max_examples=200, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(mutants())
def test_every_mutation_validates_or_fails_naming_a_key(mutant):
    raw, done = mutant
    note(f"mutations: {done}")
    try:
        check_config(raw, SCHEMA)
    except ConfigError as err:
        lines = str(err).splitlines()
        assert lines, "an empty config error"
        unnamed = [line for line in lines if not NAMES_A_KEY.search(line)]
        assert not unnamed, f"lines naming no config key: {unnamed}"


def test_an_override_through_a_value_names_the_run_and_the_key():
    """A hole the fuzz found: an override whose key runs through a value (`model.repa.enabled`
    is a bool, not a section) stopped with a message naming neither the run nor `config.`."""
    raw = copy.deepcopy(TINY)
    raw["experiments"]["figureB"]["runs"]["size_s_align_on"]["model.repa.enabled.x"] = 1
    with pytest.raises(ConfigError) as err:
        check_config(raw, SCHEMA)
    assert str(err.value) == (
        "config.experiments.figureB.runs.size_s_align_on -> override model.repa.enabled.x: "
        "config.model.repa.enabled is a value, not a section; fix the override's key")
