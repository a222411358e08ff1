"""xfusion.align_encoder: REPA's tiny-scale target is no evaluator. Its dense labels follow the
rendered scene; the DAG trains it on train-split scene records only and hands it to training runs
only, never to a metric; its saved weights share no tensor with any evaluator's."""

from __future__ import annotations

import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from eval import attribute_classifier, judges
from xfusion import align_encoder
from xfusion.caption import caption_file
from xfusion.config import load_run
from xfusion.data.world import BACKGROUND, POSITIONS, render, sample_scene, write_split

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).with_name("snakemake")


def test_patch_labels_cover_every_drawn_pixel_and_name_the_object_at_its_centre():
    rng = random.Random(0)
    grid, size = 8, 32
    for _ in range(30):
        scene = sample_scene(rng, max_shapes=3)
        labels = align_encoder.patch_labels(scene, grid)  # (P, 3)
        pixels = np.asarray(render(scene, size), dtype=np.int16)  # (H, W, 3)
        drawn = np.abs(pixels - np.array(BACKGROUND)).sum(-1) > 0  # (H, W)
        p = size // grid
        drawn = torch.from_numpy(drawn.reshape(grid, p, grid, p).any(axis=(1, 3)).reshape(-1))
        assert not (drawn & (labels[:, 0] == 0)).any()  # no drawn patch is called background
        names = align_encoder.vocab()
        for obj in scene["objects"]:
            fx, fy = POSITIONS[obj["position"]]
            k = int(fy * grid) * grid + int(fx * grid)  # the patch holding the object's centre
            assert [names[a][int(c)] for a, c in zip(align_encoder.ATTRIBUTES, labels[k])] == [
                obj["shape"], obj["colour"], obj["size"]]


@pytest.fixture(scope="module")
def tiny_plan(tmp_path_factory):
    """`snakemake -n -p -F` of the whole tiny DAG into a temp results dir."""
    raw = yaml.safe_load((ROOT / "config" / "tiny.yaml").read_text())
    raw["results_dir"] = str(tmp_path_factory.mktemp("r") / "tiny")
    path = tmp_path_factory.mktemp("c") / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    proc = subprocess.run([str(SNAKEMAKE), "-n", "-p", "-F", "--cores", "2", "--configfile",
                           str(path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return raw["results_dir"], proc.stdout + proc.stderr


def _jobs(plan: str) -> list[tuple[str, list[str], str]]:
    """(rule, input paths, shell command) of every job of a dry run."""
    out = []
    for block in re.split(r"\n(?=rule |localrule )", plan):
        rule = re.match(r"(?:local)?rule (\w+):", block.strip())
        if rule:
            inputs = re.search(r"^\s*input: (.*)$", block, re.M)
            command = re.search(r"^\s*Shell command: (.*)$", block, re.M)
            out.append((rule.group(1), inputs.group(1).split(", ") if inputs else [],
                        command.group(1) if command else ""))
    return out


def test_the_align_encoder_trains_on_its_own_split_and_feeds_training_only(tiny_plan):
    """What the rules read: the align encoder's only data are the align split's images and scene
    records, which no other job reads (no evaluator, no training run, no caption); the judges fit
    image-caption pairs, the attribute classifier another module's objective; no metric job
    reads the align encoder, and every REPA run trains toward it, not toward the CLIP judge."""
    R, plan = tiny_plan
    jobs = _jobs(plan)
    [(_, inputs, command)] = [j for j in jobs if j[0] == "align_encoder"]
    assert sorted(inputs) == [f"{R}/world/align/images", f"{R}/world/align/scenes.jsonl"]
    assert "-m xfusion.align_encoder " in command
    assert not re.search(r"heldout|train|captions", command + " ".join(inputs))
    others = [(rule, i, c) for rule, i, c in jobs if rule not in ("align_encoder", "world")]
    assert not [rule for rule, i, c in others if "/world/align" in " ".join(i) + c]
    evaluators = [" ".join(i) + c for rule, i, c in others
                  if rule in ("judges", "attribute_classifier")]
    assert len(evaluators) == 2 and all("/world/train/" in e for e in evaluators)
    [(_, judge_inputs, _)] = [j for j in jobs if j[0] == "judges"]
    assert f"{R}/captions/train.jsonl" in judge_inputs  # image-text objectives
    [(_, _, classifier)] = [j for j in jobs if j[0] == "attribute_classifier"]
    assert "-m eval.attribute_classifier " in classifier
    readers = {rule for rule, inputs, _ in jobs if f"{R}/align_encoder" in inputs}
    assert readers == {"train_run"}
    repa_runs = [cmd for rule, _, cmd in jobs if rule == "train_run" and "_align_on " in cmd]
    assert len(repa_runs) == 3
    assert all(f"--align-encoder {R}/align_encoder" in c and "--judges" not in c
               for c in repa_runs)


def _toy(root: Path) -> Path:
    """A 40 + 16 + 24 (align) image toy world with captions, and tiny.yaml set to train every model on it in
    a few steps at widths where the judges' vision towers match the align encoder's shapes."""
    raw = yaml.safe_load((ROOT / "config" / "tiny.yaml").read_text())
    raw["results_dir"] = str(root)
    raw["evaluation"].update(judge_steps=3, judge_width=32, judge_batch_size=8, attr_steps=3,
                             attr_width=8, attr_batch_size=8)
    raw["model"]["repa"].update(feature_dim=32, align={"steps": 3, "batch_size": 8, "layers": 2})
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    data = load_run(config).data
    for split, n in (("train", 40), ("heldout", 16), ("align", 24)):
        write_split(root / "world", split, n, data, seed=0)
        caption_file(root / "world" / split / "scenes.jsonl", root / "captions" / f"{split}.jsonl",
                     data.captioner, "stop")
    return config


def test_saved_align_encoder_shares_no_tensor_with_any_evaluator(tmp_path):
    """Trained by each module's own entry point on the same toy world, the align encoder's
    weights equal no tensor of the CLIP judge, the ITM judge or the attribute classifier
    (constant tensors, such as an untouched norm's ones, are no shared weights)."""
    config = _toy(tmp_path)
    world, caps = tmp_path / "world", tmp_path / "captions"
    align_encoder.main(["--config", str(config), "--scenes",
                        str(world / "align" / "scenes.jsonl"), "--out", str(tmp_path / "align")])
    judges.main(["--config", str(config), "--scenes", str(world / "heldout" / "scenes.jsonl"),
                 "--captions", str(caps / "heldout.jsonl"), "--train-scenes",
                 str(world / "train" / "scenes.jsonl"), "--train-captions",
                 str(caps / "train.jsonl"), "--out", str(tmp_path / "judges")])
    attribute_classifier.main(["--config", str(config), "--train-scenes",
                               str(world / "train" / "scenes.jsonl"), "--scenes",
                               str(world / "heldout" / "scenes.jsonl"), "--out",
                               str(tmp_path / "attr")])
    ours = load_file(str(tmp_path / "align" / "model.safetensors"))
    evaluators = {name: load_file(str(tmp_path / path)) for name, path in (
        ("clip", "judges/clip/model.safetensors"), ("itm", "judges/itm/model.safetensors"),
        ("attribute_classifier", "attr/model.safetensors"))}
    learned = {n: t for n, t in ours.items() if t.unique().numel() > 1}
    assert any(n.endswith("embeddings.patch_embedding.weight") for n in learned)
    same_shape = 0
    for name, tensors in evaluators.items():
        for other, e in tensors.items():
            for mine, t in learned.items():
                if t.shape == e.shape:
                    same_shape += 1
                    assert not torch.equal(t, e), f"align encoder {mine} == {name} {other}"
    assert same_shape > 0  # the judges' vision towers have tensors of the same shapes


def test_a_scale_without_scene_records_cannot_train_it(tmp_path):
    scenes = tmp_path / "scenes.jsonl"
    scenes.write_text('{"id": "a", "image": "a.png"}\n')
    with pytest.raises(SystemExit, match="scene records"):
        align_encoder.main(["--config", str(ROOT / "config" / "tiny.yaml"), "--scenes",
                            str(scenes), "--out", str(tmp_path / "out")])
