"""eval.itm: BLIP-2 ITM P(match) * 100; the trained judge prefers true pairs; LAVIS backend."""

from __future__ import annotations

import json

import pytest
import torch

from eval import itm
from test_clip_score import heldout
from test_judges import trained_judges, toy_config
from xfusion.io import atomic_write_jsonl, read_jsonl


def test_matching_captions_score_higher_than_shuffled_captions():
    root, _ = trained_judges()
    model, processor = itm.load_itm(str(root / "judges" / "itm"))
    images, captions = heldout(root)
    matched = itm.itm_match_probs(model, processor, images, captions)
    shuffled = itm.itm_match_probs(model, processor, images, captions[1:] + captions[:1])
    assert matched.mean() > shuffled.mean() + 0.1


def test_match_probability_is_the_softmax_of_the_itm_logits():
    root, _ = trained_judges()
    model, processor = itm.load_itm(str(root / "judges" / "itm"))
    images, captions = heldout(root)
    with torch.no_grad():
        logits = itm.itm_logits(model, processor, images[:4], captions[:4])
    probs = itm.itm_match_probs(model, processor, images[:4], captions[:4], batch_size=3)
    assert logits.shape == (4, 2)
    assert torch.allclose(probs, logits.softmax(-1)[:, 1], atol=1e-5)
    assert ((0 <= probs) & (probs <= 1)).all()


def i2t_file(root, path, n=5):
    rows = read_jsonl(root / "world" / "heldout" / "scenes.jsonl")[:n]
    caps = {r["id"]: r["caption"] for r in read_jsonl(root / "captions" / "heldout.jsonl")}
    atomic_write_jsonl(path, [{"id": r["id"], "image": r["image"], "reference": caps[r["id"]],
                               "caption": caps[r["id"]]} for r in rows])


def test_cli_reads_i2t_captions_and_writes_the_metric_json(tmp_path):
    root, config = trained_judges()
    i2t_file(root, root / "samples" / "i2t.jsonl")  # R-relative image paths, as sample writes
    out = tmp_path / "blip.json"
    itm.main(["--config", str(config), "--captions", str(root / "samples" / "i2t.jsonl"),
              "--judges", str(root / "judges"), "--out", str(out)])
    record = json.loads(out.read_text())
    assert set(record) == {"metric", "value", "run", "step", "n", "recipe", "details"}
    assert record["metric"] == "blip" and record["n"] == 5 and 0 <= record["value"] <= 100
    assert record["details"]["backend"] == "transformers"


def test_lavis_backend_without_its_environment_stops_with_a_clear_message(tmp_path):
    root, _ = trained_judges()
    i2t_file(root, root / "samples" / "i2t_lavis.jsonl", n=2)
    config = toy_config(tmp_path, itm_backend="lavis")
    with pytest.raises(SystemExit, match="lavis-env"):
        itm.main(["--config", str(config), "--captions", str(root / "samples" / "i2t_lavis.jsonl"),
                  "--lavis-python", str(tmp_path / "no-such-python"), "--out",
                  str(tmp_path / "blip.json")])


def test_judge_name_without_judges_dir_stops_with_a_clear_message(tmp_path):
    root, config = trained_judges()
    i2t_file(root, root / "samples" / "i2t_nojudge.jsonl", n=2)
    with pytest.raises(SystemExit, match="--judges"):
        itm.main(["--config", str(config), "--captions",
                  str(root / "samples" / "i2t_nojudge.jsonl"), "--out",
                  str(tmp_path / "blip.json")])
