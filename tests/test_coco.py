"""xfusion.data.coco: the COCO evaluation split (seeded sample, centre-crop, overlap with the
training images, bad inputs), and the modules downstream of it (latents, FID, CLIP score,
Supp. Fig. E) on a stand-in COCO captions file + image folder made from tiny-world images."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from bad_files import report_items, write_png, write_truncated
from eval import caption_metrics, clip_score, fid
from eval.judges import build_clip, build_itm, build_tokenizer
from xfusion import latents
from xfusion.caption import scene_caption
from xfusion.config import load_run
from xfusion.data import coco
from xfusion.data.world import write_split
from xfusion.io import atomic_write_jsonl, read_jsonl

ROOT = Path(__file__).resolve().parents[1]
N_IMAGES = 10
FIRST_ID = 1000  # COCO ids of the stand-in images: 1000 … 1009


def coco_standin(root: Path, n: int = N_IMAGES) -> tuple[Path, Path, dict[int, dict]]:
    """n tiny-world images as COCO val2014 in its layout: `val2014/COCO_val2014_<id>.jpg`
    (JPEG) and `annotations/captions_val2014.json` with three captions per image. Returns
    (annotations file, image folder, COCO id -> the world record)."""
    data = replace(load_run(ROOT / "config" / "tiny.yaml").data, max_shapes=1)
    write_split(root / "src", "heldout", n, data, seed=0)
    images_dir, records = root / "val2014", {}
    images_dir.mkdir()
    images, annotations = [], []
    for k, row in enumerate(read_jsonl(root / "src" / "heldout" / "scenes.jsonl")):
        cid = FIRST_ID + k
        name = f"COCO_val2014_{cid:012d}.jpg"
        pixels = np.array(Image.open(root / row["image"]).convert("RGB"))
        pixels[:2, :2] = 20 * k  # one world scene may repeat: each COCO file has its own bytes
        Image.fromarray(pixels).save(images_dir / name, format="JPEG", quality=95)
        images.append({"id": cid, "file_name": name, "height": 32, "width": 32})
        reference = caption_metrics.reference_caption(row["scene"])
        for j, text in enumerate((row["short_caption"], reference, f"a picture of {reference}")):
            annotations.append({"image_id": cid, "id": 10 * cid + j, "caption": text})
        records[cid] = row
    path = root / "annotations" / "captions_val2014.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"info": {}, "images": images, "annotations": annotations}))
    return path, images_dir, records


def eval_name(cid: int) -> str:
    return f"COCO_val2014_{cid:012d}"


@pytest.fixture
def standin(tmp_path):
    """(annotations, images, training folder of three unrelated images, records)."""
    annotations, images, records = coco_standin(tmp_path)
    train = tmp_path / "train"
    for k in range(3):
        write_png(train / f"img_{k}.png", seed=k)
    return annotations, images, train, records


def split(standin, root: Path, n: int, seed: int = 0, policy: str = "skip") -> list[dict]:
    """The coco split of n images in the results dir `root` (root/world/coco), its records."""
    annotations, images, train, _ = standin
    coco.write_split(annotations, images, train, root / "world" / "coco", 32, n, seed, policy)
    return read_jsonl(root / "world" / "coco" / "scenes.jsonl")


def test_seeded_sample_is_reproducible_has_n_samples_and_one_caption_per_image(standin, tmp_path):
    first = split(standin, tmp_path / "a", 6)
    again = split(standin, tmp_path / "b", 6)
    assert len(first) == 6 and len({r["id"] for r in first}) == 6
    assert (tmp_path / "a/world/coco/scenes.jsonl").read_bytes() == \
        (tmp_path / "b/world/coco/scenes.jsonl").read_bytes()
    assert [(tmp_path / "a" / r["image"]).read_bytes() for r in first] == \
        [(tmp_path / "b" / r["image"]).read_bytes() for r in again]
    assert sorted(p.name for p in (tmp_path / "a/world/coco/images").iterdir()) == \
        sorted(f"{r['id']}.png" for r in first)
    # a smaller n_samples is a prefix of a larger one; another seed draws another sample
    assert split(standin, tmp_path / "c", 3) == first[:3]
    other = split(standin, tmp_path / "d", 6, seed=1)
    assert [r["id"] for r in other] != [r["id"] for r in first]
    # the prompt is one of the image's human captions, the others are its references
    annotations = json.loads(standin[0].read_text())["annotations"]
    prompts = read_jsonl(tmp_path / "a/world/coco/prompts.jsonl")
    chosen = []
    for row, prompt in zip(first, prompts):
        captions = [a["caption"] for a in annotations if a["image_id"] == row["coco_id"]]
        assert row["id"] == eval_name(row["coco_id"]) == prompt["id"]
        assert prompt["caption"] == row["short_caption"] and prompt["image"] == row["image"]
        assert sorted([row["short_caption"], *row["references"]]) == sorted(captions)
        chosen.append(captions.index(row["short_caption"]))
        assert row["scene"] is None and row["labels"] is None
    assert len(set(chosen)) > 1  # seeded per image, not always the first caption


def test_eval_images_are_centre_cropped_and_resized(standin, tmp_path):
    annotations, images_dir, _, _ = standin
    # landscape: red | green (the centre square) | blue; portrait: red / green / blue
    wide = np.zeros((40, 64, 3), np.uint8)
    wide[:, :12] = (255, 0, 0)
    wide[:, 12:52] = (0, 255, 0)
    wide[:, 52:] = (0, 0, 255)
    tall = wide.transpose(1, 0, 2).copy()
    coco_json = json.loads(annotations.read_text())
    for k, pixels in enumerate((wide, tall)):
        name = coco_json["images"][k]["file_name"]
        Image.fromarray(pixels).save(images_dir / name, format="PNG")  # lossless, named .jpg
    split(standin, tmp_path / "R", N_IMAGES)
    for k in range(2):
        out = Image.open(tmp_path / "R" / "world" / "coco" / "images" / f"{eval_name(FIRST_ID + k)}.png")
        assert out.size == (32, 32) and out.mode == "RGB"
        assert np.abs(np.asarray(out, np.int16) - (0, 255, 0)).max() <= 2


def test_overlap_by_file_hash_and_coco_id_is_left_out_and_reported(standin, tmp_path):
    _, images_dir, train, _ = standin
    shutil.copy(images_dir / f"{eval_name(1002)}.jpg", train / "duplicate.jpg")  # same bytes
    write_png(train / "000000001004.jpg", seed=7)  # train2017's naming, other pixels
    write_png(train / "sub" / "COCO_train2014_000000001006.jpg", seed=8)  # train2014's
    rows = split(standin, tmp_path / "R", N_IMAGES - 3)  # every image is examined
    assert {r["coco_id"] for r in rows} == set(range(FIRST_ID, FIRST_ID + N_IMAGES)) - {
        1002, 1004, 1006}
    assert report_items(tmp_path / "R" / "world" / "coco" / "overlap.json") == {
        (f"{eval_name(1002)}.jpg", None, "overlap (same file, sha256)"),
        (f"{eval_name(1004)}.jpg", None, "overlap (same COCO id)"),
        (f"{eval_name(1006)}.jpg", None, "overlap (same COCO id)")}
    items = json.loads((tmp_path / "R" / "world" / "coco" / "overlap.json").read_text())["items"]
    assert any(i["reason"].endswith(str(train / "duplicate.jpg")) for i in items)


def test_overlap_under_stop_exits_naming_both_files(standin, tmp_path):
    _, images_dir, train, _ = standin
    shutil.copy(images_dir / f"{eval_name(1003)}.jpg", train / "duplicate.jpg")
    with pytest.raises(SystemExit) as exc:
        split(standin, tmp_path / "R", N_IMAGES, policy="stop")
    message = str(exc.value.code)
    assert f"bad input {images_dir / eval_name(1003)}.jpg" in message
    assert str(train / "duplicate.jpg") in message and "data.bad_input_policy" in message


def test_too_few_clean_images_for_n_samples_is_an_error_naming_the_counts(standin, tmp_path):
    _, images_dir, train, _ = standin
    shutil.copy(images_dir / f"{eval_name(1001)}.jpg", train / "duplicate.jpg")
    with pytest.raises(SystemExit) as exc:
        split(standin, tmp_path / "R", N_IMAGES)
    message = str(exc.value.code)
    assert f"only {N_IMAGES - 1} of evaluation.n_samples = {N_IMAGES}" in message
    assert "1 are also training images" in message
    assert (tmp_path / "R" / "world" / "coco" / "overlap.json").exists()
    assert not (tmp_path / "R" / "world" / "coco" / "scenes.jsonl").exists()


def with_bad_annotations(annotations: Path) -> None:
    coco_json = json.loads(annotations.read_text())
    coco_json["annotations"] += [{"image_id": 1001, "id": 1},  # no caption
                                 {"image_id": 1005, "id": 2, "caption": "   "},
                                 {"image_id": 999999, "id": 3, "caption": "no such image"}]
    coco_json["images"].append({"file_name": "COCO_val2014_000000000042.jpg"})  # no id
    annotations.write_text(json.dumps(coco_json))


def test_corrupt_image_and_bad_annotations_are_skipped_and_reported(standin, tmp_path):
    annotations, images_dir, _, _ = standin
    with_bad_annotations(annotations)
    write_truncated(images_dir / f"{eval_name(1003)}.jpg")
    rows = split(standin, tmp_path / "R", N_IMAGES - 1)  # the next image takes its place
    assert len(rows) == N_IMAGES - 1 and 1003 not in {r["coco_id"] for r in rows}
    # the good captions of images with a bad annotation are still used
    assert {1001, 1005} <= {r["coco_id"] for r in rows}
    report = json.loads((tmp_path / "R" / "world" / "coco" / "bad_inputs.json").read_text())
    assert report["policy"] == "skip" and report["n_bad"] == 5
    assert report["counts"] == {"incomplete record": 3, "empty caption": 1, "corrupt image": 1}
    where = {(Path(i["file"]).name, i["reason"].split(":")[0]) for i in report["items"]}
    assert where == {(annotations.name, "incomplete record"), (annotations.name, "empty caption"),
                     (f"{eval_name(1003)}.jpg", "corrupt image")}


def test_bad_inputs_under_stop_exit_naming_the_first(standin, tmp_path):
    annotations, images_dir, _, _ = standin
    write_truncated(images_dir / f"{eval_name(1003)}.jpg")
    with pytest.raises(SystemExit) as exc:
        split(standin, tmp_path / "R", N_IMAGES, policy="stop")
    assert f"bad input {images_dir / eval_name(1003)}.jpg: corrupt image" in str(exc.value.code)
    with_bad_annotations(annotations)
    with pytest.raises(SystemExit) as exc:
        split(standin, tmp_path / "R2", N_IMAGES, policy="stop")
    assert f"bad input {annotations}: incomplete record" in str(exc.value.code)


def test_an_annotation_file_that_is_not_coco_stops_under_skip(standin, tmp_path):
    annotations = standin[0]
    annotations.write_bytes(b'{"images": [], "annotations": [')
    with pytest.raises(SystemExit, match="not a COCO captions JSON"):
        split(standin, tmp_path / "R", 2)
    annotations.write_text('{"images": {}}')
    with pytest.raises(SystemExit, match="lists `images` and `annotations`"):
        split(standin, tmp_path / "R", 2)


def coco_config(root: Path, annotations: Path, images: Path, n: int) -> Path:
    raw = yaml.safe_load((ROOT / "config" / "tiny.yaml").read_text())
    raw["results_dir"] = str(root / "R")
    raw["data"]["eval"] = {"coco_annotations": str(annotations), "coco_images": str(images)}
    raw["evaluation"].update(n_samples=n, judge_width=32, judge_layers=1)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_coco_keys_are_set_both_or_neither(standin, tmp_path):
    annotations, images, _, _ = standin
    raw = yaml.safe_load(coco_config(tmp_path, annotations, images, 4).read_text())
    raw["data"]["eval"]["coco_images"] = None
    (tmp_path / "half.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match="config.data.eval = .*set both"):
        load_run(tmp_path / "half.yaml")


def tiny_judges(cfg_path: Path, texts: list[str], out: Path) -> None:
    """Random CLIP and BLIP-2 ITM judges of the real classes (eval.judges' builders, untrained)."""
    cfg = load_run(cfg_path)
    torch.manual_seed(0)
    tokenizer = build_tokenizer(texts, 64)
    for name, build in (("clip", build_clip), ("itm", build_itm)):
        model, processor = build(cfg, tokenizer)
        model.save_pretrained(out / name)
        processor.save_pretrained(out / name)


def test_split_feeds_latents_fid_clip_score_and_figure_e(standin, tmp_path):
    annotations, images_dir, train, records = standin
    n = 6
    config = coco_config(tmp_path, annotations, images_dir, n)
    out = tmp_path / "R" / "world" / "coco"
    coco.main(["--config", str(config), "--train", str(train), "--out", str(out)])
    scenes, prompts = read_jsonl(out / "scenes.jsonl"), out / "prompts.jsonl"
    assert len(scenes) == n and json.loads((out / "overlap.json").read_text())["n_bad"] == 0
    # our captioner's long captions of the split (the caption rule's output layout)
    captions = tmp_path / "R" / "captions" / "coco.jsonl"
    atomic_write_jsonl(captions, [{"id": r["id"], "image": r["image"], "caption": scene_caption(
        r["id"], records[r["coco_id"]]["scene"])} for r in scenes])
    # I2T reads the split's latents: the latents module reads the captions layout
    lat = tmp_path / "R" / "latents" / "coco.safetensors"
    latents.encode_split(captions, lat, load_run(config), torch.device("cpu"))
    assert latents.load_latents(lat)[1] == [r["id"] for r in scenes]
    # T2I: "generated" images for the prompts (world images), scored against them and COCO
    generated = tmp_path / "R" / "samples" / "t2i"
    generated.mkdir(parents=True)
    index = [{"index": i, "id": p["id"], "prompt": p["caption"], "file": f"{i}.png"}
             for i, p in enumerate(read_jsonl(prompts))]
    for entry in index:
        shutil.copy(tmp_path / "src" / "heldout" / "images" / f"heldout_{entry['index']:06d}.png",
                    generated / entry["file"])
    atomic_write_jsonl(generated / "index.jsonl", index)
    texts = [r["short_caption"] for r in scenes] + [c["caption"] for c in read_jsonl(captions)]
    judges = tmp_path / "R" / "judges"
    tiny_judges(config, [t for r in scenes for t in r["references"]] + texts, judges)
    metrics = tmp_path / "R" / "metrics"
    record = fid.main(["--config", str(config), "--generated", str(generated), "--reference",
                       str(out / "images"), "--cache", str(tmp_path / "R" / "fid_ref"),
                       "--judges", str(judges), "--out", str(metrics / "fid.json")])
    assert record["details"]["n_reference"] == n and record["value"] >= 0
    assert len(list((tmp_path / "R" / "fid_ref").glob("*stat-fid*"))) == 1
    record = clip_score.main(["--config", str(config), "--samples", str(generated / "index.jsonl"),
                              "--judges", str(judges), "--out", str(metrics / "clip.json")])
    assert record["n"] == n
    # Supp. Fig. E: our long caption vs the sampled human caption, BERTScore against the others
    record = caption_metrics.main(["--config", str(config), "--scenes", str(out / "scenes.jsonl"),
                                   "--captions", str(captions), "--judges", str(judges),
                                   "--out", str(metrics / "caption_metrics.json")])
    rows = record["details"]["rows"]
    assert record["n"] == n and set(rows) == {"long_detailed_caption", "short_poor_caption"}
    assert record["details"]["example"]["references"] == scenes[0]["references"]
    # the human caption is a paraphrase of its references: its BERTScore beats the long one's
    assert rows["short_poor_caption"]["bertscore"] > rows["long_detailed_caption"]["bertscore"]
