"""Downstream task data (xfusion.data.tasks) and their metrics (eval.tasks): each generator's
ground truth is exact, and each metric scores a perfect prediction perfectly and a wrong one not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from eval.attribute_classifier import world_vocab
from eval.tasks import (box_iou, edit_detected, exact_match, feature_distance, localisation_iou,
                        mask_region, pixel_error)
from xfusion.config import DataConfig
from xfusion.data import load_pixels, resolve_image
from xfusion.data.tasks import (IMAGE_TASKS, MASK_FILL, TASKS, generate_tasks, object_box,
                                parse_box)
from xfusion.data.world import BACKGROUND, COLOURS, POSITIONS, SHAPES, render, write_split
from xfusion.io import read_jsonl

SIZE = 32


def make_world(root: Path, n: int = 24, max_shapes: int = 3) -> Path:
    world = root / "world"
    data = DataConfig(n_train=n, n_heldout=n // 2, max_shapes=max_shapes, image_size=SIZE)
    for split, k in (("train", data.n_train), ("heldout", data.n_heldout)):
        write_split(world, split, k, data, seed=0)
    return world


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> tuple[Path, dict[str, list[dict]]]:
    root = tmp_path_factory.mktemp("tasks")
    world = make_world(root)
    return root / "tasks", generate_tasks(root / "tasks", SIZE, seed=0, world=world)


def pixels(row: dict, key: str, tasks_dir: Path) -> torch.Tensor:
    return load_pixels(resolve_image(row[key], tasks_dir / "train" / "tasks.jsonl"))


def test_every_task_is_generated_with_its_fields(tasks):
    out, splits = tasks
    assert set(splits) == {"train", "heldout"}
    rows = splits["train"]
    assert {r["task"] for r in rows} == set(TASKS)
    assert read_jsonl(out / "train" / "tasks.jsonl") == rows
    for r in rows:
        assert r["prompt"] and r["source"]
        assert (r["target"] is not None) == (r["task"] in IMAGE_TASKS)
        assert (r["answer"] is not None) == (r["task"] not in IMAGE_TASKS)
    kinds = {r["truth"]["kind"] for r in rows if r["task"] == "vqa"}
    assert kinds == {"attribute", "count", "relation"}


def test_same_seed_same_bytes_other_seed_other_tasks(tmp_path, tasks):
    _, splits = tasks
    world = make_world(tmp_path)
    again = generate_tasks(tmp_path / "tasks", SIZE, seed=0, world=world)
    assert again == splits
    other = generate_tasks(tmp_path / "other", SIZE, seed=1, world=world)
    assert [r["prompt"] for r in other["train"]] != [r["prompt"] for r in splits["train"]]


def test_edit_target_is_the_edited_scene_rendered(tasks):
    out, splits = tasks
    for r in [r for r in splits["train"] if r["task"] == "editing"][:6]:
        truth = r["truth"]
        edited = truth["scene"]["objects"][truth["object"]]
        assert edited[truth["attribute"]] == truth["to"] != truth["from"]
        assert truth["from"] in r["prompt"] and truth["to"] in r["prompt"]
        target = pixels(r, "target", out)
        expected = load_pixels_of(render(truth["scene"], SIZE))
        assert torch.equal(target, expected)
        assert pixel_error(pixels(r, "source", out), target) > 0  # the edit changed pixels


def load_pixels_of(img) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0


def test_box_holds_exactly_the_object_pixels():
    for shape in SHAPES:
        for position in POSITIONS:
            obj = {"shape": shape, "colour": "red", "size": "large", "position": position}
            img = load_pixels_of(render({"objects": [obj], "relations": []}, SIZE))
            bg = torch.tensor(BACKGROUND, dtype=torch.float32)[:, None, None] / 127.5 - 1
            drawn = (img - bg).abs().amax(0) > 1e-3  # (H, W): any pixel the shape touches
            x0, y0, x1, y1 = object_box(obj, SIZE)
            inside = torch.zeros_like(drawn)
            inside[y0:y1, x0:x1] = True
            assert drawn.any() and not (drawn & ~inside).any(), (shape, position)
            # tight: the drawn pixels reach each side of the box but one pixel at most
            ys, xs = drawn.nonzero(as_tuple=True)
            assert xs.min() - x0 <= 1 and x1 - 1 - xs.max() <= 1
            assert ys.min() - y0 <= 1 and y1 - 1 - ys.max() <= 1


def test_localisation_answer_is_the_box_as_text(tasks):
    _, splits = tasks
    for r in [r for r in splits["train"] if r["task"] == "localisation"]:
        assert parse_box(r["answer"]) == [float(v) for v in r["truth"]["box"]]
        assert localisation_iou(r["answer"], r["truth"]["box"]) == 1.0


def test_painting_masks_exactly_the_region_and_target_is_the_image(tasks):
    out, splits = tasks
    fill = torch.tensor(MASK_FILL, dtype=torch.float32) / 127.5 - 1
    for r in [r for r in splits["train"] if r["task"] == "painting"][:8]:
        src, tgt = pixels(r, "source", out), pixels(r, "target", out)
        region = mask_region(r["truth"], SIZE)
        assert torch.allclose(src[:, region], fill[:, None].expand(3, int(region.sum())))
        assert torch.equal(src[:, ~region], tgt[:, ~region])
        assert pixel_error(tgt, tgt, region) == 0.0
        assert pixel_error(src, tgt, region) > 0


def test_vqa_answers_follow_the_scene(tasks):
    _, splits = tasks
    scenes = {r["id"]: r["scene"] for r in read_jsonl(tasks[0].parent / "world" / "train"
                                                      / "scenes.jsonl")}
    for r in [r for r in splits["train"] if r["task"] == "vqa"]:
        objects = scenes[r["scene_id"]]["objects"]
        kind = r["truth"]["kind"]
        if kind == "count":
            from xfusion.data.world import NUMBER_WORDS
            assert r["answer"] == NUMBER_WORDS[len(objects)]
        elif kind == "attribute":
            pos = r["prompt"].rstrip("?").split()[-1]
            obj = next(o for o in objects if o["position"] == pos)
            assert r["answer"] in (obj["colour"], obj["shape"])
        else:
            assert r["answer"] in ("left of", "right of", "above", "below")


def test_folder_layout_is_read_checked_and_made_absolute(tmp_path, tasks):
    out, splits = tasks
    folder = tmp_path / "user"
    for split in ("train", "heldout"):
        (folder / split).mkdir(parents=True)
        src = resolve_image(splits["train"][0]["source"], out / "train" / "tasks.jsonl")
        (folder / split / "a.png").write_bytes(src.read_bytes())
        rows = [{"id": "e1", "task": "editing", "source": "a.png", "prompt": "make it blue.",
                 "target": "a.png"},
                {"id": "q1", "task": "vqa", "source": "a.png", "prompt": "what?", "answer": "red"}]
        (folder / split / "tasks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = generate_tasks(tmp_path / "t", SIZE, seed=0, folder=folder)
    assert [r["id"] for r in got["train"]] == ["e1", "q1"]
    assert Path(got["train"][0]["source"]).is_absolute()
    bad = folder / "train" / "tasks.jsonl"
    bad.write_text(json.dumps({"id": "x", "task": "vqa", "source": "a.png", "prompt": "q"}) + "\n")
    with pytest.raises(SystemExit, match="needs 'answer'"):
        generate_tasks(tmp_path / "t2", SIZE, seed=0, folder=folder)


# --- metrics: perfect scores perfectly, wrong does not -------------------------------------------

def test_pixel_and_feature_distances():
    a = torch.rand(3, 8, 8) * 2 - 1
    assert pixel_error(a, a) == 0.0
    assert pixel_error(-torch.ones(3, 8, 8), torch.ones(3, 8, 8)) == pytest.approx(1.0)
    f = torch.randn(4, 16)
    assert torch.allclose(feature_distance(f, f), torch.zeros(4), atol=1e-6)
    assert (feature_distance(f, -f) > 1.9).all()


def test_edit_detected_reads_the_edited_cell():
    truth = {"cell": "left", "attribute": "colour", "to": "blue"}
    assert edit_detected({"left": {"shape": "circle", "colour": "blue"}}, truth)
    assert not edit_detected({"left": {"shape": "circle", "colour": "red"}}, truth)
    assert not edit_detected({"left": None, "right": {"shape": "circle", "colour": "blue"}},
                             truth)
    assert set(world_vocab()["colour"]) >= set(COLOURS)


def test_iou_perfect_partial_and_garbage():
    assert box_iou([0, 0, 4, 4], [0, 0, 4, 4]) == 1.0
    assert box_iou([0, 0, 4, 4], [2, 0, 6, 4]) == pytest.approx(1 / 3)
    assert box_iou([0, 0, 2, 2], [5, 5, 8, 8]) == 0.0
    assert localisation_iou("1 11 12 21", [1, 11, 12, 21]) == 1.0
    assert localisation_iou("[1, 11, 12, 21]", [1, 11, 12, 21]) == 1.0
    assert localisation_iou("the left", [1, 11, 12, 21]) == 0.0
    assert localisation_iou("20 11 31 21", [1, 11, 12, 21]) == 0.0


def test_exact_match_normalises_case_space_and_full_stop():
    assert exact_match(" Red.", "red") == 1.0
    assert exact_match("left of", "left of") == 1.0
    assert exact_match("blue", "red") == 0.0
    assert exact_match("red circle", "red") == 0.0
