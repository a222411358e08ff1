"""eval.clip_score: 100 * max(cos, 0) per pair (Hessel et al.), then the mean, with a CLIPModel;
the trained judge prefers true pairs."""

from __future__ import annotations

import json

import pytest
import torch

from bad_files import assert_stops_naming, jsonl_with, report_items, write_image_of, write_png
from eval import clip_score
from eval.common import load_images, read_pairs
from test_judges import trained_judges
from xfusion.data import BadInputs
from xfusion.io import atomic_write_jsonl, read_jsonl


def heldout(root):
    rows = read_jsonl(root / "world" / "heldout" / "scenes.jsonl")
    caps = {r["id"]: r["caption"] for r in read_jsonl(root / "captions" / "heldout.jsonl")}
    images = load_images([root / r["image"] for r in rows])
    return images, [caps[r["id"]] for r in rows]


def test_matching_pairs_score_higher_than_shuffled_pairs():
    root, _ = trained_judges()
    model, processor = clip_score.load_clip(str(root / "judges" / "clip"))
    images, captions = heldout(root)
    matched = clip_score.clip_scores(model, processor, images, captions)
    shuffled = clip_score.clip_scores(model, processor, images, captions[1:] + captions[:1])
    assert matched.mean() > shuffled.mean() + 5


def test_scores_are_100_cos_clipped_at_zero():
    root, _ = trained_judges()
    model, processor = clip_score.load_clip(str(root / "judges" / "clip"))
    images, captions = heldout(root)
    img = clip_score.clip_features(model, processor, images=images[:8])
    txt = clip_score.clip_features(model, processor, texts=captions[:8])
    assert torch.allclose(img.norm(dim=-1), torch.ones(8), atol=1e-5)
    cos = img @ txt.T  # (8, 8): every image against every caption
    scores = clip_score.clip_scores(model, processor, images[:8] * 8,
                                    [c for c in captions[:8] for _ in range(8)])
    assert torch.allclose(scores, 100 * cos.T.reshape(-1).clamp(min=0), atol=1e-3)
    assert (scores >= 0).all()


def test_cli_reads_a_t2i_index_and_writes_the_metric_json(tmp_path):
    root, config = trained_judges()
    rows = read_jsonl(root / "world" / "heldout" / "scenes.jsonl")[:6]
    caps = {r["id"]: r["caption"] for r in read_jsonl(root / "captions" / "heldout.jsonl")}
    index = [{"index": i, "id": r["id"], "prompt": caps[r["id"]], "file": str(root / r["image"])}
             for i, r in enumerate(rows)]
    atomic_write_jsonl(tmp_path / "index.jsonl", index)
    out = tmp_path / "clip.json"
    clip_score.main(["--config", str(config), "--samples", str(tmp_path / "index.jsonl"),
                     "--judges", str(root / "judges"), "--run", "dual_tower", "--step", "200",
                     "--out", str(out)])
    record = json.loads(out.read_text())
    assert set(record) == {"metric", "value", "run", "step", "n", "recipe", "details"}
    assert record["metric"] == "clip" and record["n"] == 6 and 0 < record["value"] <= 100
    assert record["details"]["model"] == "judge_clip"


def test_each_pair_is_clipped_before_the_mean_unlike_torchmetrics(monkeypatch):
    # Two pairs with cosines 0.8 and -0.6, from unit features built for it: Hessel et al.'s
    # CLIP-S (ours) gives mean(80, 0) = 40; torchmetrics' clipped mean gives max(10, 0) = 10.
    image = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    text = torch.tensor([[0.8, 0.6], [-0.6, 0.8]])
    monkeypatch.setattr(clip_score, "clip_features",
                        lambda model, processor, images=None, texts=None, **_: (
                            image if images is not None else text))
    scores = clip_score.clip_scores(None, None, ["im0", "im1"], ["a", "b"])
    cos = (image * text).sum(-1)
    assert torch.allclose(scores, torch.tensor([80.0, 0.0]))
    assert abs(scores.mean().item() - (100 * cos).clamp(min=0).mean().item()) < 1e-5
    torchmetrics = max((100 * cos).mean().item(), 0)  # the clipped mean
    assert abs(scores.mean().item() - torchmetrics) > 25


@pytest.mark.parametrize("kind", ["corrupt image", "truncated image", "undecodable line",
                                  "incomplete record"])
def test_pairs_that_are_bad_inputs_are_left_out_and_named_or_stop(tmp_path, kind):
    rows = [{"index": i, "prompt": f"p{i}", "file": str(write_png(tmp_path / f"{i}.png", i))}
            for i in range(3)]
    image = write_image_of(kind, tmp_path / "bad.png")
    record = {"index": 9, "prompt": "CAFE", "file": str(image)}
    if kind == "incomplete record":
        del record["prompt"]
    index = tmp_path / "index.jsonl"
    index.write_bytes(jsonl_with(rows, record, kind))
    bad = BadInputs("skip")
    paths, prompts, _ = read_pairs(index, "prompt", bad, image_key="file")
    assert [p.name for p in paths] == ["0.png", "1.png", "2.png"] and prompts == ["p0", "p1", "p2"]
    bad.finish(tmp_path / "clip.bad_inputs.json")
    expected = ({("bad.png", None, "corrupt image")} if kind.endswith("image")
                else {("index.jsonl", 3, kind)})
    assert report_items(tmp_path / "clip.bad_inputs.json") == expected
    where = str(image) if kind.endswith("image") else f"{index}:3"
    assert_stops_naming(lambda: read_pairs(index, "prompt", BadInputs("stop"), image_key="file"),
                        where)
