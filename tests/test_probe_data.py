"""The linear probe's data path: ImageFolder reader (xfusion.data.image_folder), the tiny world's
probe set (xfusion.data.world_probe), its encoding (xfusion.probe_data), and eval.linear_probe
end to end on them with a tiny saved model."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from xfusion.config import DataConfig, apply_overrides, load_yaml, run_from_dict
from xfusion.data.image_folder import find_classes, image_folder_samples

REPO = Path(__file__).resolve().parents[1]


def _image(path: Path, size=(8, 6), colour=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def test_classes_are_the_sorted_folder_names_and_samples_walk_in_sorted_order(tmp_path):
    for name in ("n02", "b", "A", "n10"):  # created out of order
        _image(tmp_path / name / "z.png")
        _image(tmp_path / name / "a.JPEG")  # suffixes match case-insensitively
    _image(tmp_path / "b" / "deeper" / "c.jpg")  # below a class folder: still that class
    (tmp_path / "b" / "notes.txt").write_text("not an image")
    (tmp_path / "b" / ".x.png.123.partial").write_text("a write in progress")
    (tmp_path / "stray.png").write_bytes(b"")  # a file at the root is no class
    classes, index = find_classes(tmp_path)
    assert classes == ["A", "b", "n02", "n10"] and index == {"A": 0, "b": 1, "n02": 2, "n10": 3}
    samples, _ = image_folder_samples(tmp_path)
    rel = [(p.relative_to(tmp_path).as_posix(), k) for p, k in samples]
    assert rel == [("A/a.JPEG", 0), ("A/z.png", 0), ("b/a.JPEG", 1), ("b/z.png", 1),
                   ("b/deeper/c.jpg", 1), ("n02/a.JPEG", 2), ("n02/z.png", 2),
                   ("n10/a.JPEG", 3), ("n10/z.png", 3)]
    assert image_folder_samples(tmp_path) == (samples, classes)  # deterministic
    capped, _ = image_folder_samples(tmp_path, max_per_class=1)
    assert [(p.name, k) for p, k in capped] == [("a.JPEG", 0), ("a.JPEG", 1), ("a.JPEG", 2),
                                                ("a.JPEG", 3)]


def test_reader_agrees_with_torchvision_image_folder(tmp_path):
    folder = pytest.importorskip("torchvision.datasets.folder")
    rng = random.Random(0)
    for k in range(12):
        cls = rng.choice(["n01440764", "n01443537", "cat", "Dog"])
        sub = rng.choice(["", "x/", "x/y/"])
        _image(tmp_path / cls / f"{sub}{rng.randrange(10 ** 6)}.{rng.choice(['png', 'JPG'])}")
    ours, classes = image_folder_samples(tmp_path)
    assert (classes, find_classes(tmp_path)[1]) == folder.find_classes(str(tmp_path))
    theirs = folder.make_dataset(str(tmp_path), find_classes(tmp_path)[1],
                                 extensions=folder.IMG_EXTENSIONS)
    assert [(str(p), k) for p, k in ours] == theirs


def test_an_empty_root_or_class_folder_is_a_layout_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no class folders"):
        find_classes(tmp_path)
    _image(tmp_path / "a" / "1.png")
    (tmp_path / "b").mkdir()
    with pytest.raises(FileNotFoundError, match="class folders b"):
        image_folder_samples(tmp_path)


@pytest.fixture(scope="module")
def world_probe_set(tmp_path_factory) -> Path:
    """A small tiny world (train 40, heldout 16 images, one shape each) and its probe set."""
    from xfusion.data import world, world_probe
    root = tmp_path_factory.mktemp("w")
    data = DataConfig(max_shapes=1)
    world.write_split(root / "world", "train", 40, data, seed=0)
    world.write_split(root / "world", "heldout", 16, data, seed=0)
    world_probe.write_split(root / "world" / "train" / "scenes.jsonl", root / "probe" / "train")
    world_probe.write_split(root / "world" / "heldout" / "scenes.jsonl", root / "probe" / "val")
    return root


def test_world_probe_set_holds_the_world_images_in_folders_of_their_shape(world_probe_set):
    root = world_probe_set
    for split, source in (("train", "train"), ("val", "heldout")):
        rows = [json.loads(l) for l in (root / "world" / source / "scenes.jsonl").open()]
        samples, classes = image_folder_samples(root / "probe" / split)
        assert classes == sorted({r["labels"]["shape"] for r in rows})
        assert len(samples) == len(rows)
        by_id = {r["id"]: r for r in rows}
        for path, k in samples:
            row = by_id[path.stem]
            assert classes[k] == row["labels"]["shape"]
            assert path.read_bytes() == (root / row["image"]).read_bytes()


def _cfg(overrides=None):
    return run_from_dict(apply_overrides(load_yaml(REPO / "config" / "tiny.yaml"),
                                         overrides or {}))


def test_probe_set_is_the_codec_of_the_centre_crop_with_sorted_labels(tmp_path):
    """A non-square image is centre-cropped and resized to data.image_size, then encoded like
    the training latents (the tiny codec is exact, so the latents give the pixels back)."""
    from xfusion.codec import build_codec
    from xfusion.data import to_pixels
    from xfusion.data.folder import centre_crop_resize
    from xfusion.probe_data import encode_probe_set, load_probe_set

    cfg = _cfg()
    wide = Image.new("RGB", (48, 32), (0, 0, 255))
    wide.paste((255, 0, 0), (8, 0, 40, 32))  # a red centre square between blue margins
    wide.save(_image(tmp_path / "img" / "square" / "w.png"))
    _image(tmp_path / "img" / "circle" / "c.png", size=(40, 40), colour=(0, 200, 0))
    out = tmp_path / "probe.safetensors"
    encode_probe_set(tmp_path / "img", out, cfg, torch.device("cpu"))
    probe = load_probe_set(out)
    assert probe.classes == ["circle", "square"] and probe.labels.tolist() == [0, 1]
    assert probe.ids == ["circle/c.png", "square/w.png"]
    codec = build_codec(cfg.model.codec)
    expected = codec.encode(to_pixels(centre_crop_resize(wide, 32), "w")[None])
    assert torch.allclose(probe.latents[1:], expected)
    red = codec.decode(probe.latents[1:])[0]  # (3, 32, 32): the crop left the margins out
    assert red[0].mean() > 0.9 and red[2].mean() < -0.9


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_a_corrupt_image_is_skipped_and_reported_or_stops(tmp_path, policy):
    from xfusion.probe_data import encode_probe_set, load_probe_set

    good = _image(tmp_path / "img" / "a" / "good.png")
    _image(tmp_path / "img" / "b" / "good.png")
    bad = tmp_path / "img" / "b" / "truncated.png"
    bad.write_bytes(good.read_bytes()[:40])
    out = tmp_path / "probe.safetensors"
    cfg = _cfg({"data.bad_input_policy": policy})
    if policy == "stop":
        with pytest.raises(SystemExit, match="truncated.png"):
            encode_probe_set(tmp_path / "img", out, cfg, torch.device("cpu"))
        assert not out.exists()
        return
    encode_probe_set(tmp_path / "img", out, cfg, torch.device("cpu"))
    assert load_probe_set(out).ids == ["a/good.png", "b/good.png"]
    report = json.loads((tmp_path / "probe.bad_inputs.json").read_text())
    assert report["n_bad"] == 1 and report["counts"] == {"corrupt image": 1}
    assert report["items"][0]["file"] == str(bad)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    """A dual_tower model dir on a 2-layer base LLM with a BPE tokenizer, as training writes."""
    from xfusion.config import TinyLlamaConfig
    from xfusion.model import XFusionModel
    from xfusion.model.base import build_tiny_llama, load_base_llm, text_weight_hash
    from xfusion.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("model")
    tok = train_bpe(["An image.", "a large red circle is at the left."] * 10, vocab_size=300)
    torch.manual_seed(0)
    llm = build_tiny_llama(TinyLlamaConfig(hidden_size=32, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2,
                                           intermediate_size=64), len(tok), tok.bos_token_id,
                           tok.eos_token_id, tok.pad_token_id)
    llm.save_pretrained(root / "hf")
    tok.save_pretrained(root / "hf")
    base = {"path": str(root / "hf"), "tokenizer": str(root / "hf"),
            "text_weight_hash": text_weight_hash(llm)}
    (root / "base_model.json").write_text(json.dumps(base))
    model = XFusionModel.from_base(_cfg(), *load_base_llm(root / "base_model.json"), base_ref=base)
    model.save(root / "step")
    return root / "step"


def test_linear_probe_runs_end_to_end_on_the_world_image_folder(world_probe_set, saved_model,
                                                               tiny_config, tmp_path):
    """ImageFolder -> probe sets -> features per layer in both modes -> one head per layer."""
    from eval import linear_probe
    from xfusion.config import load_run
    from xfusion.probe_data import encode_probe_set

    config = tiny_config({"evaluation.probe_layers": [1, 2], "evaluation.probe_epochs": 3,
                          "evaluation.probe_batch_size": 1024})
    cfg = load_run(config)
    for split in ("train", "val"):
        encode_probe_set(world_probe_set / "probe" / split, tmp_path / f"{split}.safetensors",
                         cfg, torch.device("cpu"))
    out = tmp_path / "probe.json"
    record = linear_probe.main(["--config", str(config), "--model", str(saved_model),
                                "--train", str(tmp_path / "train.safetensors"),
                                "--val", str(tmp_path / "val.safetensors"), "--out", str(out)])
    assert json.loads(out.read_text()) == record
    assert record["metric"] == "probe" and record["n"] == 16
    details = record["details"]
    assert details["n_train"] == 40 and details["batch_size"] == 40  # capped at the train size
    assert details["n_classes"] == len(image_folder_samples(world_probe_set / "probe" / "train")[1])
    assert details["prompt"] == cfg.evaluation.probe_prompt
    assert set(details["per_layer"]) == {"understanding", "generation"}
    for mode in details["per_layer"].values():
        assert set(mode) == {"1", "2"} and all(0.0 <= a <= 1.0 for a in mode.values())
    assert record["value"] == max(details["per_layer"]["understanding"].values())
    # accuracies are counts of the 16 val images
    assert all((16 * a) == pytest.approx(round(16 * a)) for m in details["per_layer"].values()
               for a in m.values())
