"""The whole config checked before any job: schema, every run, and everything it points to.

Snakemake calls `check_config` while it parses the workflow (workflow/rules/common.smk) and
turns a ConfigError into a WorkflowError; tests call it directly. Three passes, each stopping
with every problem it found, one line each, naming the dotted key:
1. the JSON schema (workflow/schemas/config.schema.yaml) on the config and on each run
   (the config with the run's overrides applied): missing and unknown keys, types, ranges;
2. xfusion.config's typed checks (`resolve_run`): the values every entry point re-checks;
3. references (`reference_messages`): local paths exist; hub ids are well-formed and, with
   HF_HUB_OFFLINE=1, in the local cache; layer indices fit the base LLM they index (its config
   read through transformers.AutoConfig, never the weights); evaluator names are known.

References are checked here, not in `xfusion.config.run_from_dict`: a checkpoint's config is
reloaded on machines where its paths need not exist. The parse never touches the network: it
runs again in every cluster job, and an unreachable hub would cost each parse minutes of retries.
"""

from __future__ import annotations

import difflib
import functools
import re
from pathlib import Path
from typing import Any, Mapping

import jsonschema

from xfusion.config import ALIGN_ENCODER, JUDGE_NAMES, ConfigError, RunConfig, all_runs
from xfusion.config import apply_overrides
from xfusion.config import experiments_from_dict, experiments_using, resolve_run, run_from_dict


def _part(key: Any) -> str:
    """One component of a dotted key; quoted where it is not a plain name (a key of spaces, a
    line break or nothing would otherwise garble the message)."""
    return key if isinstance(key, str) and re.fullmatch(r"[\w.\-]+", key) else repr(key)


def schema_messages(raw: Any, schema: Mapping[str, Any], prefix: str = "config") -> list[str]:
    """Every schema violation of `raw` as `config.a.b = value: why` (empty when valid)."""
    messages = []
    errors = jsonschema.Draft202012Validator(schema).iter_errors(raw)
    for err in sorted(errors, key=lambda e: [str(p) for p in e.absolute_path]):
        key = ".".join([prefix, *map(_part, err.absolute_path)])
        if err.validator == "required":
            missing = [k for k in err.validator_value if k not in err.instance]
            messages += [f"{key}.{k}: missing required key" for k in missing]
        elif err.validator == "additionalProperties" and err.validator_value is False:
            known = err.schema.get("properties", {})
            unknown = sorted((k for k in err.instance if k not in known), key=str)
            messages += [f"{key}.{_part(k)}: unknown key (known: {', '.join(known)})"
                         for k in unknown]
        else:
            messages.append(f"{key} = {err.instance!r}: {err.message}")
    return messages


def check_config(raw: Mapping[str, Any], schema: Mapping[str, Any]) -> dict[str, RunConfig]:
    """Every run of the config, resolved (run name -> RunConfig); a ConfigError listing every
    problem of the first pass that found any, one per line, otherwise."""
    messages = schema_messages(raw, schema)
    if messages:
        raise ConfigError("\n".join(messages))
    runs = all_runs(raw)  # also checks each experiment (xfusion.config.Experiment)
    for exp_name, spec in raw["experiments"].items():
        for run in spec.get("runs") or {}:
            where = f"config.experiments.{exp_name}.runs.{run} ->"
            try:
                resolved = apply_overrides(raw, runs[run])
            except ConfigError as err:
                messages.append(f"{where} {err}")
                continue
            messages += [f"{where} {m}" for m in schema_messages(resolved, schema)]
    if messages:
        raise ConfigError("\n".join(messages))
    resolved = {name: resolve_run(raw, name) for name in runs}
    messages = reference_messages(raw, run_from_dict(raw), resolved)
    if messages:
        raise ConfigError("\n".join(messages))
    return resolved


# ---- references --------------------------------------------------------------------------------

# Keys naming an evaluator or encoder: the models the pipeline trains itself that each may name
# (eval.judges' judges, eval/common.py's JUDGES), or else a checkpoint (a local path or a hub
# id); fid_extractor is checked on its own.
PIPELINE_MODELS = {
    "evaluation.clip_model": ("judge_clip",),
    "evaluation.itm_model": ("judge_itm",),
    "evaluation.bertscore_model": ("judge_clip",),
    "model.repa.encoder": (ALIGN_ENCODER, "judge_clip"),
}
FID_JUDGE = "judge_clip"  # else a torch-fidelity feature extractor (eval/fid.py)


def reference_messages(raw: Mapping[str, Any], recipe: RunConfig,
                       runs: Mapping[str, RunConfig]) -> list[str]:
    """What the recipe and each run point to, checked; a problem the recipe has is reported
    once, for the recipe, and one that several runs share once, naming them all."""
    probed = {run for exp in experiments_from_dict(raw).values() if exp.measure == "probe"
              for run in exp.runs}
    messages = run_references(recipe, probe=False)
    if probed:
        messages += probe_data_messages(recipe)
    runs_with: dict[str, list[str]] = {}  # problem -> the runs that have it
    for name, run in runs.items():
        for problem in run_references(run, probe=name in probed):
            if problem not in messages:
                runs_with.setdefault(problem, []).append(name)
    for problem, (first, *others) in runs_with.items():
        also = f" (the same in runs {', '.join(others)})" if others else ""
        messages.append(f"config.experiments.{experiments_using(raw, first)[0]}.runs.{first} -> "
                        f"{problem}{also}")
    return messages


def run_references(cfg: RunConfig, probe: bool) -> list[str]:
    """The problems of one resolved run's references; `probe`: a probe experiment measures it,
    so evaluation.probe_layers index its base LLM."""
    m, d, e = cfg.model, cfg.data, cfg.evaluation
    out: list[str] = []
    if m.base_lm.source == "pretrained":
        out += model_reference("model.base_lm.path", m.base_lm.path)
    if m.codec.kind == "autoencoder_kl":
        out += model_reference("model.codec.path", m.codec.path)
        local = Path(m.codec.path or "").expanduser()
        if m.codec.path and m.codec.subfolder and local.is_dir() and not (
                local / m.codec.subfolder).is_dir():
            out.append(f"config.model.codec.subfolder = {m.codec.subfolder!r}: no such directory "
                       f"in model.codec.path ({m.codec.path}); fix it or set it to null")
    if d.source == "folder":
        out += local_reference("data.image_dir", d.image_dir, "directory")
    if d.eval.coco_annotations:  # the COCO evaluation set (xfusion.data.coco)
        out += local_reference("data.eval.coco_annotations", d.eval.coco_annotations, "file")
        out += local_reference("data.eval.coco_images", d.eval.coco_images, "directory")
    if d.captioner.backend == "hf":
        out += model_reference("data.captioner.model", d.captioner.model)
    if d.tokenizer_path:
        out += model_reference("data.tokenizer_path", d.tokenizer_path)
    if e.mmlu_path:
        out += local_reference("evaluation.mmlu_path", e.mmlu_path, "directory")
    if e.fid_weights:
        out += local_reference("evaluation.fid_weights", e.fid_weights, "file")
    out += fid_extractor_messages(e.fid_extractor)
    evaluators = {"evaluation.clip_model": e.clip_model, "evaluation.itm_model": e.itm_model,
                  "evaluation.bertscore_model": e.bertscore_model}
    if m.repa.enabled:
        evaluators["model.repa.encoder"] = m.repa.encoder
    trained = {name for names in PIPELINE_MODELS.values() for name in names}
    for key, name in evaluators.items():
        if name in PIPELINE_MODELS[key]:
            continue
        # a pipeline model of another key, or a misspelt one ("align_encodr" is no hub id to try)
        misspelt = difflib.get_close_matches(name, trained, n=1, cutoff=0.8)
        if name in trained | set(JUDGE_NAMES) or name.startswith("judge_") or misspelt:
            out.append(f"config.{key} = {name!r}: not a model of the pipeline this key can name; "
                       f"use {' or '.join(PIPELINE_MODELS[key])} or a checkpoint (local path or "
                       "hub id)")
        elif key == "model.repa.encoder" and m.repa.encoder_path:
            out += model_reference("model.repa.encoder_path", m.repa.encoder_path)
        else:
            out += model_reference(key, name)
    layers = {"model.repa.layer": (m.repa.layer,)} if m.repa.enabled else {}
    if probe:
        layers["evaluation.probe_layers"] = e.probe_layers
    if layers:
        out += layer_messages(cfg, layers)
    return out


def probe_data_messages(cfg: RunConfig) -> list[str]:
    """The linear probe's ImageFolder splits (data.probe.*) exist; null means the tiny world's
    own probe set, which only the world source writes."""
    out: list[str] = []
    for split in ("train", "val"):
        key = f"data.probe.{split}_dir"
        value = getattr(cfg.data.probe, f"{split}_dir")
        if value:
            out += local_reference(key, value, "directory")
        elif cfg.data.source != "world":
            out.append(f"config.{key} = None: an experiment measures the linear probe and "
                       f"data.source is {cfg.data.source!r}, so the probe needs its labelled "
                       "images: an ImageFolder directory (one subfolder per class, e.g. "
                       f"ImageNet's {split}/); set the key")
    return out


def local_reference(key: str, value: str | None, kind: str) -> list[str]:
    """A path that must exist on this machine (`kind`: directory or file)."""
    if not value:
        return [f"config.{key} = {value!r}: a {kind} is needed here; set the key"]
    path = Path(value).expanduser()
    if path.is_dir() if kind == "directory" else path.is_file():
        return []
    where = "" if path.is_absolute() else f" (relative to {Path.cwd()}, where Snakemake runs)"
    return [f"config.{key} = {value!r}: no such {kind}{where}; create it or point the key at "
            "an existing one"]


def _looks_local(value: str) -> bool:
    return value.startswith(("/", ".", "~")) or value.count("/") > 1


def model_reference(key: str, value: str | None) -> list[str]:
    """A checkpoint: an existing local directory, or a well-formed hub id that the job can fetch
    (with HF_HUB_OFFLINE=1 it must already be in the local cache)."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not value:
        return [f"config.{key} = {value!r}: a local path or hub id is needed here; set the key"]
    if Path(value).expanduser().exists():
        return []
    if _looks_local(value):
        return local_reference(key, value, "directory")
    try:
        validate_repo_id(value)
    except HFValidationError:
        return [f"config.{key} = {value!r}: neither an existing local path nor a hub id "
                "(name or namespace/name); fix the value"]
    if constants.HF_HUB_OFFLINE and not hub_cached(value):
        return [f"config.{key} = {value!r}: a hub id, but HF_HUB_OFFLINE=1 and it is not in the "
                f"local Hugging Face cache ({constants.HF_HUB_CACHE}); download it first "
                f"(`hf download {value}`, with network) or point the key at a local directory"]
    return []


def hub_cached(repo_id: str) -> bool:
    """Whether a snapshot of the hub model `repo_id` is in the local cache (HF_HUB_CACHE)."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    snapshots = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id,
                                                                repo_type="model") / "snapshots"
    return snapshots.is_dir() and any(snapshots.iterdir())


def fid_extractor_messages(name: str) -> list[str]:
    if name == FID_JUDGE:
        return []
    import torch_fidelity.registry  # imports torch: only when a torch-fidelity extractor is named

    known = torch_fidelity.registry.FEATURE_EXTRACTORS_REGISTRY
    if name in known:
        return []
    return [f"config.evaluation.fid_extractor = {name!r}: unknown feature extractor; use "
            f"{FID_JUDGE} (the CLIP judge) or one of torch-fidelity's: {', '.join(known)}"]


def layer_messages(cfg: RunConfig, layers: Mapping[str, tuple[int, ...]]) -> list[str]:
    """Layer indices (1-based, as XFusionModel.image_hidden_states counts) within the depth of
    the run's base LLM; where its config cannot be read, one message naming the base's key."""
    base = cfg.model.base_lm
    if base.source == "tiny":
        depth, source = base.tiny.num_hidden_layers, "model.base_lm.tiny"
    else:
        source = "model.base_lm.path"
        depth = pretrained_depth(base.path)
        if isinstance(depth, str):
            return [f"config.{source} = {base.path!r}: {depth}; its config.json is read before "
                    f"any job to check {' and '.join(layers)} (the parse never downloads): fetch "
                    f"it (`hf download {base.path} config.json`) or point the key at a local "
                    "model directory"]
    return [f"config.{key} = {list(values) if len(values) > 1 else values[0]!r}: the base LLM "
            f"({source}: {base.name}) has {depth} layers; each index must be in [1, {depth}]"
            for key, values in layers.items() if not all(1 <= v <= depth for v in values)]


@functools.lru_cache(maxsize=None)
def pretrained_depth(path: str) -> int | str:
    """num_hidden_layers of a local model directory or a cached hub model (the text model's, for
    a multimodal config), from its config alone; a string saying why where it cannot be read."""
    from huggingface_hub import constants
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        if Path(path).expanduser().exists() or _looks_local(path):
            return f"no readable model config there ({str(err).splitlines()[0]})"
        offline = ", HF_HUB_OFFLINE=1" if constants.HF_HUB_OFFLINE else ""
        return f"a hub id not in the local Hugging Face cache ({constants.HF_HUB_CACHE}{offline})"
    depth = getattr(config.get_text_config(), "num_hidden_layers", None)
    return depth if isinstance(depth, int) else "its model config has no num_hidden_layers"
