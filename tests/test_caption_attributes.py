"""eval.caption_attributes (`i2t_attr_recall`): the reference caption names every attribute and
nothing false, another image's caption scores low, an empty caption names nothing, a word salad
scores its chance precision."""

from __future__ import annotations

import json
import random

import pytest

from eval import caption_attributes as ca
from xfusion.caption import COUNT_WORDS, scene_caption
from xfusion.data.world import sample_scene
from xfusion.io import atomic_write_jsonl

N = 300


def world(n: int = N, seed: int = 0) -> tuple[list[str], list[dict]]:
    rng = random.Random(seed)
    scenes = [sample_scene(rng, 3) for _ in range(n)]
    return [f"heldout_{i:06d}" for i in range(n)], scenes


def word_salad(rng: random.Random) -> str:
    """One uniformly drawn word per category (the count as its phrase) among filler words."""
    words = [str(rng.choice(ca.VOCAB[c])) for c in ("shape", "colour", "size", "position")]
    words += [COUNT_WORDS[rng.choice(ca.VOCAB["count"])], "the", "is", "a", "there"]
    rng.shuffle(words)
    return " ".join(words)


def test_reference_caption_scores_one():
    ids, scenes = world()
    result = ca.score([scene_caption(i, s) for i, s in zip(ids, scenes)], scenes)
    assert result["recall"] == 1.0 and result["precision"] == 1.0
    assert result["objects"] == {"recall": 1.0, "precision": 1.0}
    assert all(v == {"recall": 1.0, "precision": 1.0} for v in result["per_category"].values())


def test_relation_words_are_not_positions():
    scene = {"objects": [{"shape": "cross", "colour": "red", "size": "large", "position": "top"},
                         {"shape": "circle", "colour": "blue", "size": "small",
                          "position": "right"}]}
    facts = ca.caption_facts("The left of the image is empty. The red cross is to the left of "
                             "the blue circle.")
    assert ("position", "left") in facts  # "the left of the image": a position
    facts = ca.caption_facts("The red cross is to the left of the blue circle.")
    assert not {f for f in facts if f[0] == "position"}
    assert ca.caption_pairs("a red cross, a blue circle") == ca.record_pairs(scene)


def test_shuffled_caption_scores_low_and_binding_near_zero():
    ids, scenes = world()
    captions = [scene_caption(i, s) for i, s in zip(ids, scenes)]
    result = ca.score(captions[1:] + captions[:1], scenes)  # each image gets the next one's
    assert result["recall"] < 0.6 and result["precision"] < 0.6
    assert result["precision"] == pytest.approx(result["chance_precision"], abs=0.1)
    assert result["objects"]["recall"] < 0.15


def test_empty_caption_has_zero_recall_and_no_precision():
    _, scenes = world(20)
    result = ca.score([""] * 20, scenes)
    assert result["recall"] == 0.0 and result["precision"] is None and result["n_naming"] == 0


def test_word_salad_scores_chance_precision():
    _, scenes = world()
    rng = random.Random(1)
    result = ca.score([word_salad(rng) for _ in scenes], scenes)
    assert result["precision"] == pytest.approx(result["chance_precision"], abs=0.05)
    for category, chance in result["chance_per_category"].items():
        assert result["per_category"][category]["precision"] == pytest.approx(chance, abs=0.1)
    assert result["recall"] < 0.4


def test_cli_writes_the_metric_json(tmp_path, tiny_config):
    ids, scenes = world(10)
    atomic_write_jsonl(tmp_path / "scenes.jsonl",
                       [{"id": i, "image": f"{i}.png", "scene": s, "short_caption": None,
                         "labels": {"shape": s["objects"][0]["shape"],
                                    "colour": s["objects"][0]["colour"]}}
                        for i, s in zip(ids, scenes)])
    atomic_write_jsonl(tmp_path / "i2t.jsonl",
                       [{"id": i, "image": f"{i}.png", "reference": scene_caption(i, s),
                         "caption": scene_caption(i, s) if k % 2 else ""}
                        for k, (i, s) in enumerate(zip(ids, scenes))])
    out = tmp_path / "i2t_attr_recall.json"
    record = ca.main(["--config", str(tiny_config()), "--captions", str(tmp_path / "i2t.jsonl"),
                      "--scenes", str(tmp_path / "scenes.jsonl"), "--run", "dual_tower",
                      "--step", "400", "--out", str(out)])
    assert json.loads(out.read_text()) == record
    assert record["metric"] == "i2t_attr_recall" and record["n"] == 10
    assert record["value"] == pytest.approx(0.5)  # half the captions empty
    assert record["details"]["precision"] == 1.0 and record["details"]["n_naming"] == 5
