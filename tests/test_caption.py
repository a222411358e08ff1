import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from bad_files import KINDS, assert_stops_naming, jsonl_with, report_items, write_image_of
from xfusion.caption import HFCaptioner, caption_file, scene_caption
from xfusion.config import CaptionerConfig
from xfusion.io import read_jsonl

SCENE = {"objects": [{"shape": "triangle", "colour": "red", "size": "large", "position": "left"},
                     {"shape": "circle", "colour": "blue", "size": "small", "position": "right"},
                     {"shape": "cross", "colour": "orange", "size": "small", "position": "top"}],
         "relations": [{"subject": 0, "relation": "left of", "object": 1},
                       {"subject": 0, "relation": "left of", "object": 2},
                       {"subject": 1, "relation": "right of", "object": 2}]}
WORDS = ["red", "blue", "green", "triangle", "circle", "a", "the", "image", "shape", "left"]


def test_scene_caption_mentions_every_object_and_relation():
    caption = scene_caption("train_000007", SCENE)
    for obj in SCENE["objects"]:
        for key in ("colour", "shape", "size", "position"):
            assert obj[key] in caption, (key, caption)
    assert "to the left of" in caption or "to the right of" in caption
    assert "three shapes" in caption


def test_scene_caption_is_deterministic_per_id_and_varies_across_ids():
    assert scene_caption("x1", SCENE) == scene_caption("x1", SCENE)
    assert len({scene_caption(f"x{i}", SCENE) for i in range(20)}) > 1


def write_scenes(root: Path, n: int) -> Path:
    """n coloured 32 px images under root/world/train and their scenes.jsonl."""
    rows = []
    for i in range(n):
        path = root / "world" / "train" / "images" / f"im{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), (40 * i % 255, 90, 200)).save(path)
        rows.append({"id": f"im{i}", "image": f"world/train/images/im{i}.png", "scene": SCENE,
                     "labels": None, "short_caption": None})
    scenes = root / "world" / "train" / "scenes.jsonl"
    scenes.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return scenes


def test_scene_backend_writes_one_caption_per_scene_in_order(tmp_path):
    scenes = write_scenes(tmp_path, 3)
    out = tmp_path / "captions" / "train.jsonl"
    assert caption_file(scenes, out, CaptionerConfig(backend="scene"), "stop") == 3
    assert [r["id"] for r in read_jsonl(out)] == ["im0", "im1", "im2"]


SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def save_random_captioner(model, processor, path: Path) -> str:
    """Save a random model and its processor; a random model may stop at once or emit only
    special tokens, so force a few real words: the tests check plumbing, not luck."""
    model.generation_config.min_new_tokens = 3
    model.generation_config.suppress_tokens = [0, 1, 2, 4]
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory) -> str:
    """A randomly initialised BLIP captioner with a locally built processor, saved to disk."""
    from transformers import (BertTokenizer, BlipConfig, BlipForConditionalGeneration,
                              BlipImageProcessor, BlipProcessor)
    tok = BertTokenizer(vocab={t: i for i, t in enumerate(SPECIALS + WORDS)})
    processor = BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tok)
    config = BlipConfig(
        text_config=dict(vocab_size=len(SPECIALS + WORDS), hidden_size=32, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                         bos_token_id=2, sep_token_id=3, pad_token_id=0),
        vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=64, image_size=32, patch_size=16),
        projection_dim=32)
    torch.manual_seed(0)
    return save_random_captioner(BlipForConditionalGeneration(config), processor,
                                 tmp_path_factory.mktemp("blip") / "tiny_blip")


@pytest.fixture(scope="module")
def tiny_git(tmp_path_factory) -> str:
    """A randomly initialised GIT captioner (decoder-only; its processor's BERT tokenizer returns
    `token_type_ids`, which GIT's generate rejects), saved to disk."""
    from transformers import (BertTokenizer, CLIPImageProcessor, GitConfig, GitForCausalLM,
                              GitProcessor)
    tok = BertTokenizer(vocab={t: i for i, t in enumerate(SPECIALS + WORDS)})
    processor = GitProcessor(CLIPImageProcessor(size={"shortest_edge": 32},
                                                crop_size={"height": 32, "width": 32}), tok)
    config = GitConfig(
        vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=64, image_size=32, patch_size=16),
        vocab_size=len(SPECIALS + WORDS), hidden_size=32, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
        bos_token_id=2, eos_token_id=3, pad_token_id=0)
    torch.manual_seed(0)
    return save_random_captioner(GitForCausalLM(config), processor,
                                 tmp_path_factory.mktemp("git") / "tiny_git")


def hf_config(model: str) -> CaptionerConfig:
    return CaptionerConfig(backend="hf", model=model, prompt="a", batch_size=2,
                           max_new_tokens=4, shard_size=2)


def test_hf_backend_on_tiny_random_blip_writes_one_caption_per_image(tiny_blip, tmp_path):
    scenes = write_scenes(tmp_path, 5)
    out = tmp_path / "captions" / "train.jsonl"
    assert caption_file(scenes, out, hf_config(tiny_blip), "stop") == 5
    rows = read_jsonl(out)
    assert [r["id"] for r in rows] == [f"im{i}" for i in range(5)]
    assert all(r["caption"] and set(r["caption"].split()) <= set(WORDS) for r in rows)
    assert sorted(p.name for p in (out.parent / "train.jsonl.shards").iterdir()) == [
        "000000.jsonl", "000001.jsonl", "000002.jsonl"]


def test_hf_backend_resumes_keeping_existing_shards(tiny_blip, tmp_path):
    scenes = write_scenes(tmp_path, 4)
    out = tmp_path / "captions" / "train.jsonl"
    shard = out.parent / "train.jsonl.shards" / "000000.jsonl"
    shard.parent.mkdir(parents=True)
    sentinel = [{"id": f"im{i}", "image": f"world/train/images/im{i}.png", "caption": "SENTINEL"}
                for i in range(2)]
    shard.write_text("".join(json.dumps(r) + "\n" for r in sentinel))
    caption_file(scenes, out, hf_config(tiny_blip), "stop")
    captions = [r["caption"] for r in read_jsonl(out)]
    assert captions[:2] == ["SENTINEL", "SENTINEL"]
    assert all(c != "SENTINEL" and c for c in captions[2:]) and len(captions) == 4


def test_empty_caption_is_bad_input_skipped_or_stopping(tiny_blip, tmp_path, monkeypatch):
    scenes = write_scenes(tmp_path, 2)
    monkeypatch.setattr(HFCaptioner, "__call__", lambda self, images: ["", "a red circle"])
    out = tmp_path / "captions" / "train.jsonl"
    assert caption_file(scenes, out, hf_config(tiny_blip), "skip") == 1
    report = json.loads((out.parent / "train.bad_inputs.json").read_text())
    assert report["n_bad"] == 1 and "im0.png" in report["items"][0]["file"]
    with pytest.raises(SystemExit, match="im0.png"):
        caption_file(scenes, tmp_path / "captions" / "other.jsonl", hf_config(tiny_blip), "stop")


def scenes_with(root: Path, kind: str) -> tuple[Path, set, str]:
    """write_scenes' four images with one bad input of `kind` as the third record
    (tests/bad_files.py). Returns the scenes file, the items a skip report must hold, and what
    a stop must name."""
    scenes = write_scenes(root, 4)
    # 33 px wide: the stand-in captioner of the empty-caption case finds it by its size
    image = write_image_of(kind, root / "world" / "train" / "images" / "bad.png", (33, 32))
    record = {"id": "bad", "image": "world/train/images/bad.png", "scene": SCENE,
              "labels": None, "short_caption": "CAFE"}
    scenes.write_bytes(jsonl_with(read_jsonl(scenes), record, kind))
    if kind == "undecodable line":
        return scenes, {("scenes.jsonl", 3, kind)}, f"{scenes}:3"
    if kind == "empty caption":
        return scenes, {("bad.png", None, kind)}, record["image"]
    return scenes, {("bad.png", None, "corrupt image")}, str(image.resolve())


def caption_empty_for_33px_images(monkeypatch) -> None:
    original = HFCaptioner.__call__
    monkeypatch.setattr(HFCaptioner, "__call__", lambda self, images: [
        "" if img.size == (33, 32) else c for img, c in zip(images, original(self, images))])


@pytest.mark.parametrize("kind", KINDS)
def test_skip_leaves_bad_inputs_out_and_a_resumed_run_reports_them_again(
        tiny_blip, tmp_path, monkeypatch, kind):
    caption_empty_for_33px_images(monkeypatch)
    scenes, expected, _ = scenes_with(tmp_path, kind)
    out = tmp_path / "captions" / "train.jsonl"
    assert caption_file(scenes, out, hf_config(tiny_blip), "skip") == 4
    assert [r["id"] for r in read_jsonl(out)] == ["im0", "im1", "im2", "im3"]
    report = out.parent / "train.bad_inputs.json"
    assert report_items(report) == expected
    report.unlink()
    out.unlink()  # a rerun after a kill: every shard is on disk, no image is read again
    monkeypatch.setattr(HFCaptioner, "__init__", None)  # would fail if the model were loaded
    assert caption_file(scenes, out, hf_config(tiny_blip), "skip") == 4
    assert report_items(report) == expected


@pytest.mark.parametrize("kind", KINDS)
def test_stop_exits_at_the_bad_input_naming_it(tiny_blip, tmp_path, monkeypatch, kind):
    caption_empty_for_33px_images(monkeypatch)
    scenes, _, where = scenes_with(tmp_path, kind)
    out = tmp_path / "captions" / "train.jsonl"
    assert_stops_naming(lambda: caption_file(scenes, out, hf_config(tiny_blip), "stop"), where)
    assert not out.exists()


@pytest.mark.parametrize("family", ["tiny_blip", "tiny_git"])
def test_hf_backend_passes_generate_only_the_inputs_it_takes(family, request, tmp_path):
    model = request.getfixturevalue(family)
    captioner = HFCaptioner(hf_config(model))
    inputs = captioner.processor(images=[Image.new("RGB", (32, 32))], text=[captioner.prompt],
                                 return_tensors="pt", padding=True)
    taken = set(inputs) & captioner.input_names
    assert {"pixel_values", "input_ids", "attention_mask"} <= taken
    if family == "tiny_git":  # the BERT tokenizer's extra output, which GIT's forward lacks
        assert "token_type_ids" in inputs and "token_type_ids" not in captioner.input_names
    scenes = write_scenes(tmp_path, 3)
    out = tmp_path / "captions" / "train.jsonl"
    assert caption_file(scenes, out, hf_config(model), "stop") == 3
    assert all(set(r["caption"].split()) <= set(WORDS) and r["caption"] for r in read_jsonl(out))
