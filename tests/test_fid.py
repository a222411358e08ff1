"""eval.fid: torch-fidelity FID with the CLIP judge registered as its feature extractor."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from eval import fid
from eval.judges import build_clip, build_tokenizer
from test_judges import toy_config, toy_world
from xfusion.config import load_run, recipe_hash, train_recipe


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A reference folder of 48 world images, noisy copies at two levels, and a random CLIP."""
    root = tmp_path_factory.mktemp("fid")
    toy_world(root, 48)
    ref = root / "world" / "heldout" / "images"
    rng = np.random.default_rng(0)
    for sigma in (10, 60):
        out = root / f"noise_{sigma}"
        out.mkdir()
        for p in sorted(ref.glob("*.png")):
            x = np.asarray(Image.open(p), dtype=np.float32)
            x = np.clip(x + rng.normal(0, sigma, x.shape), 0, 255).astype(np.uint8)
            Image.fromarray(x).save(out / p.name)
    torch.manual_seed(0)
    cfg_path = toy_config(root, judge_width=32, judge_layers=1)
    from xfusion.config import load_run
    model, processor = build_clip(load_run(cfg_path), build_tokenizer(["a shape"], 16))
    model.save_pretrained(root / "judges" / "clip")
    processor.save_pretrained(root / "judges" / "clip")
    return root, ref, cfg_path


def test_fid_of_a_set_with_itself_is_zero(folders):
    root, ref, _ = folders
    value = fid.compute_fid(ref, ref, fid.JUDGE_EXTRACTOR, str(root / "judges" / "clip"))
    assert abs(value) < 1e-3


def test_fid_grows_with_the_noise_added(folders):
    root, ref, _ = folders
    weights = str(root / "judges" / "clip")
    low = fid.compute_fid(root / "noise_10", ref, fid.JUDGE_EXTRACTOR, weights)
    high = fid.compute_fid(root / "noise_60", ref, fid.JUDGE_EXTRACTOR, weights)
    assert 0 < low < high


def test_reference_statistics_are_cached_once_and_reused(folders):
    root, ref, _ = folders
    weights, cache = str(root / "judges" / "clip"), root / "cache"
    first = fid.compute_fid(root / "noise_10", ref, fid.JUDGE_EXTRACTOR, weights, cache)
    stats = sorted(cache.glob("*stat-fid*"))
    assert len(stats) == 1 and ref.name in stats[0].name
    mtime = stats[0].stat().st_mtime_ns
    second = fid.compute_fid(root / "noise_10", ref, fid.JUDGE_EXTRACTOR, weights, cache)
    assert second == pytest.approx(first, abs=1e-6)
    assert stats[0].stat().st_mtime_ns == mtime  # read, not rewritten


def test_cli_writes_the_metric_json(folders):
    root, ref, cfg_path = folders
    out = root / "metrics" / "fid.json"
    fid.main(["--config", str(cfg_path), "--generated", str(root / "noise_10"), "--reference",
              str(ref), "--cache", str(root / "cache_cli"), "--judges", str(root / "judges"),
              "--run", "dual_tower", "--step", "400", "--out", str(out)])
    record = json.loads(out.read_text())
    assert set(record) == {"metric", "value", "run", "step", "n", "recipe", "details"}
    assert record["metric"] == "fid" and record["n"] == 48 and record["value"] > 0
    assert record["run"] == "dual_tower" and record["step"] == 400
    cfg = load_run(cfg_path, "dual_tower")  # the model's recipe and the samples' + FID's settings
    assert record["recipe"] == {"train": train_recipe(cfg), "eval": recipe_hash(cfg, "fid")}
