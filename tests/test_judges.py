"""eval.judges: tiny CLIP / BLIP-2 ITM judges trained on a tiny world, saved like hub checkpoints.

`trained_judges()` trains one small pair of judges per test session (cached) on a toy world
written by the data stage's own modules; test_clip_score, test_itm and test_caption_metrics
reuse it.
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
import yaml
from transformers import (AutoProcessor, Blip2ForImageTextRetrieval, Blip2Processor, CLIPModel,
                          CLIPProcessor)

from eval import judges
from xfusion.caption import caption_file
from xfusion.config import load_run
from xfusion.data.world import write_split

ROOT = Path(__file__).resolve().parents[1]
TOY_JUDGES = {"judge_steps": 800, "judge_width": 32, "judge_layers": 2,
              "judge_batch_size": 64,
              "judge_lr": 1.0e-3, "judge_query_tokens": 4, "judge_val_fraction": 0.2}


def toy_config(root: Path, **evaluation) -> Path:
    """config/tiny.yaml with results_dir = root and the given evaluation overrides."""
    raw = yaml.safe_load((ROOT / "config/tiny.yaml").read_text())
    raw["results_dir"] = str(root)
    raw["evaluation"].update(evaluation)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def toy_world(root: Path, n: int, split: str = "heldout",
              max_shapes: int = 1) -> tuple[Path, Path]:
    """n world images + scenes.jsonl + scene captions under root; (scenes, captions) paths.
    One shape per image by default: short captions keep the judges' training fast."""
    cfg = load_run(ROOT / "config/tiny.yaml")
    write_split(root / "world", split, n, replace(cfg.data, max_shapes=max_shapes), seed=0)
    scenes, captions = root / "world" / split / "scenes.jsonl", root / "captions" / f"{split}.jsonl"
    caption_file(scenes, captions, cfg.data.captioner, "stop")
    return scenes, captions


@functools.lru_cache(maxsize=1)
def trained_judges() -> tuple[Path, Path]:
    """(R, config) with R/judges trained on a 160-image toy world (~1 min on one core)."""
    root = Path(tempfile.mkdtemp(prefix="xfusion-judges-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    scenes, captions = toy_world(root, 160)
    config = toy_config(root, **TOY_JUDGES)
    judges.main(["--config", str(config), "--scenes", str(scenes), "--captions", str(captions),
                 "--out", str(root / "judges")])
    return root, config


def test_judges_load_back_like_hub_checkpoints():
    root, _ = trained_judges()
    clip_dir, itm_dir = root / "judges" / "clip", root / "judges" / "itm"
    assert isinstance(CLIPModel.from_pretrained(clip_dir), CLIPModel)
    assert isinstance(AutoProcessor.from_pretrained(clip_dir), CLIPProcessor)
    assert isinstance(Blip2ForImageTextRetrieval.from_pretrained(itm_dir),
                      Blip2ForImageTextRetrieval)
    assert isinstance(AutoProcessor.from_pretrained(itm_dir), Blip2Processor)


def test_quality_json_reports_judges_above_chance():
    root, _ = trained_judges()
    q = json.loads((root / "judges" / "quality.json").read_text())
    assert q["n_fit"] == 128 and q["n_val"] == 32
    assert q["clip"]["image_to_text"] > 3 * q["clip"]["chance"]
    assert q["itm"]["mean_score"]["matched"] > q["itm"]["mean_score"]["shuffled"] + 5
    assert q["clip"]["train_seconds"] > 0 and q["itm"]["train_seconds"] > 0


def test_hard_negatives_share_an_attribute_and_differ_in_caption():
    labels = [{"shape": s, "colour": c} for s in ("circle", "square", "cross")
              for c in ("red", "blue", "green")] * 2
    captions = [f"a {l['colour']} {l['shape']} #{i}" for i, l in enumerate(labels)]
    captions[9] = captions[0]  # a duplicate caption is never a negative of its twin
    sampler = judges.NegativeSampler(captions, labels)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        idx = torch.arange(len(labels))
        neg = sampler(idx, gen, hard_share=1.0)
        for i, j in zip(idx.tolist(), neg.tolist()):
            assert captions[i] != captions[j]
            assert labels[i]["shape"] == labels[j]["shape"] or \
                labels[i]["colour"] == labels[j]["colour"]


def test_negatives_without_labels_are_any_other_caption():
    captions = ["a", "b", "c", "d"]
    neg = judges.NegativeSampler(captions, [None] * 4)(torch.arange(4).repeat(25),
                                                        torch.Generator().manual_seed(0))
    assert all(captions[i % 4] != captions[j] for i, j in enumerate(neg.tolist()))


def test_derangement_pairs_every_image_with_another_caption():
    for seed in range(5):
        d = judges.derangement(17, torch.Generator().manual_seed(seed))
        assert sorted(d.tolist()) == list(range(17))
        assert (d != torch.arange(17)).all()


def test_tokenizer_appends_eos_where_clip_pools():
    tok = judges.build_tokenizer(["a red square", "a blue circle"], max_length=16)
    ids = tok(["a red square"])["input_ids"][0]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id == 3
    assert tok("a purple square")["input_ids"][2] == tok.unk_token_id


def test_judges_refuse_a_scale_without_judges(tmp_path):
    scenes, captions = toy_world(tmp_path, 4)
    config = toy_config(tmp_path, judge_steps=0)
    try:
        judges.main(["--config", str(config), "--scenes", str(scenes), "--captions",
                     str(captions), "--out", str(tmp_path / "judges")])
    except SystemExit as err:
        assert "judge_steps" in str(err)
    else:
        raise AssertionError("judge_steps = 0 must stop eval.judges")
    assert not (tmp_path / "judges").exists()
