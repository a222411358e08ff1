"""Shared fixtures. Append new fixtures; do not rewrite the ones others rely on."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from xfusion.config import apply_overrides, load_yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny_config(tmp_path: Path) -> Callable[..., Path]:
    """`tiny_config({"data.n_train": 8}, name="c.yaml")`: config/tiny.yaml with dotted
    overrides, written under tmp_path; returns its path."""

    def make(overrides: dict[str, Any] | None = None, name: str = "tiny.yaml") -> Path:
        raw = apply_overrides(load_yaml(REPO / "config" / "tiny.yaml"), overrides or {})
        path = tmp_path / name
        path.write_text(yaml.safe_dump(raw))
        return path

    return make


@pytest.fixture
def tiny_xfusion() -> Callable[..., Any]:
    """`tiny_xfusion("dual_tower", {"model.gate_text": True})`: an XFusionModel over a fresh
    2-layer Llama (hidden 32, 4 heads, 2 KV heads, vocab 64) with 4-channel 4x4 latents;
    special ids bos=1 eos=2 pad=0 boi=3 eoi=4. The same seed gives the same base weights."""
    import torch

    from xfusion.config import TinyLlamaConfig, run_from_dict
    from xfusion.model import SpecialIds, XFusionModel
    from xfusion.model.base import build_tiny_llama

    def make(architecture: str, overrides: dict[str, Any] | None = None, seed: int = 0):
        raw = apply_overrides(load_yaml(REPO / "config" / "tiny.yaml"),
                              {"model.architecture": architecture,
                               "model.codec.latent_channels": 4, **(overrides or {})})
        torch.manual_seed(seed)
        tiny = TinyLlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, intermediate_size=64)
        llm = build_tiny_llama(tiny, vocab_size=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        ids = SpecialIds(bos=1, eos=2, pad=0, boi=3, eoi=4)
        return XFusionModel.from_base(run_from_dict(raw), llm, ids)

    return make


@pytest.fixture
def mixed_samples() -> Callable[..., Any]:
    """`mixed_samples(seed)`: T2I and I2T samples of different caption lengths (4x4x4 latents),
    one with a dropped caption, so a batch has padding and both layouts."""
    import torch

    from xfusion.model import Sample

    def make(seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        lat = lambda: torch.randn(4, 4, 4, generator=g)  # noqa: E731
        return [Sample("t2i", [5, 6, 7, 8], lat(), 0.7),
                Sample("i2t", [9, 10, 11], lat(), 0.0),
                Sample("t2i", [12, 13], lat(), 0.3, drop_caption=True),
                Sample("i2t", [14, 15, 16, 17, 18], lat(), 0.2)]

    return make


# Set by xfusion.engine.setup_distributed (single-process defaults) and xfusion.tracking in the
# test process. Left behind, a later test's subprocess (a snakemake run) would inherit a
# MASTER_PORT this process still listens on, and its DeepSpeed init would fail to bind.
# The SLURM variables are those xfusion.engine.discover_ranks reads: a test run inside an srun
# step must not hand its own step to the training jobs it launches.
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                      "MLFLOW_TRACKING_URI", "LOCAL_WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS",
                      "SLURM_LOCALID", "SLURM_STEP_ID", "SLURM_STEP_NUM_TASKS", "SLURM_JOB_ID",
                      "SLURM_JOB_NODELIST", "SLURM_STEP_NODELIST")


_LAUNCHER_BASELINE = {k: os.environ.get(k) for k in LAUNCHER_VARIABLES}


@pytest.fixture(autouse=True)
def _restore_launcher_variables():
    """After each test, the launcher variables as the session started with them (a snapshot
    taken per test would miss what a module-scoped fixture set before it)."""
    yield
    for key, value in _LAUNCHER_BASELINE.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


# The depth of each base LLM config/paper.yaml names (from the models' config.json).
PAPER_BASE_DEPTHS = {"meta-llama/Llama-3.2-1B": 16, "meta-llama/Llama-3.2-3B": 28,
                     "meta-llama/Llama-3.1-8B": 32}


@pytest.fixture(scope="session")
def hub_model_config() -> Callable[[Path, str, int], None]:
    """`hub_model_config(cache, "org/name", layers)`: a Hugging Face hub cache entry (the layout
    of HF_HUB_CACHE: refs/main names one snapshot) holding only a Llama config.json of that
    depth, all that xfusion.config_check reads of a base LLM."""
    from transformers import LlamaConfig

    def write(cache: Path, repo_id: str, layers: int) -> None:
        model = cache / f"models--{repo_id.replace('/', '--')}"
        snapshot = model / "snapshots" / ("0" * 40)
        snapshot.mkdir(parents=True)
        (model / "refs").mkdir()
        (model / "refs" / "main").write_text("0" * 40)
        LlamaConfig(num_hidden_layers=layers).to_json_file(snapshot / "config.json")

    return write


def stand_in_image_folders(root: Path, classes: tuple[str, ...] = ("n01440764", "n01443537"),
                           per_class: int = 1) -> None:
    """ImageNet's layout under `root`: `train/` and `val/`, one folder per synset class, each
    with `per_class` small JPEGs (the first two ImageNet synsets' names; random pixels)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in classes:
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for k in range(per_class):
                pixels = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{name}_{k}.JPEG")


@pytest.fixture(scope="session")
def _paper_machine(tmp_path_factory, hub_model_config) -> tuple[dict[str, Any], dict[str, str]]:
    """config/paper.yaml as a machine with its data and models sees it, for paper-scale dry runs
    (xfusion.config_check resolves every reference while Snakemake parses): `data.image_dir`,
    `evaluation.mmlu_path` and `data.eval.coco_images` as empty temp dirs,
    `data.eval.coco_annotations` as a one-caption COCO captions file,
    `data.probe.{train,val}_dir` as ImageNet-style ImageFolders (stand_in_image_folders), and a
    Hugging Face cache (HF_HUB_CACHE in the returned env) holding only each base LLM's
    config.json, so the layer checks read real depths. Returns (the raw config, the env for a
    snakemake subprocess)."""
    from xfusion.config import all_runs

    root = tmp_path_factory.mktemp("paper_machine")
    overrides = {"data.image_dir": str(root / "coco"), "evaluation.mmlu_path": str(root / "mmlu"),
                 "data.eval.coco_images": str(root / "val2014"),
                 "data.probe.train_dir": str(root / "imagenet" / "train"),
                 "data.probe.val_dir": str(root / "imagenet" / "val")}
    for path in overrides.values():
        Path(path).mkdir(parents=True)
    stand_in_image_folders(root / "imagenet")
    # the COCO evaluation set: a captions_val2014.json-layout file (one image, one caption)
    annotations = root / "captions_val2014.json"
    annotations.write_text('{"images": [{"id": 1, "file_name": "COCO_val2014_000000000001.jpg"}],'
                           ' "annotations": [{"image_id": 1, "id": 1, "caption": "a cat."}]}')
    overrides["data.eval.coco_annotations"] = str(annotations)
    raw = apply_overrides(load_yaml(REPO / "config" / "paper.yaml"), overrides)
    bases = {raw["model"]["base_lm"]["path"]} | {
        o["model.base_lm.path"] for o in all_runs(raw).values() if "model.base_lm.path" in o}
    cache = root / "hf_hub"
    for repo_id in bases:
        hub_model_config(cache, repo_id, PAPER_BASE_DEPTHS[repo_id])
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    return raw, env


@pytest.fixture
def paper_config(_paper_machine) -> tuple[dict[str, Any], dict[str, str]]:
    """See _paper_machine; a copy per test, which may edit it."""
    raw, env = _paper_machine
    return copy.deepcopy(raw), dict(env)
