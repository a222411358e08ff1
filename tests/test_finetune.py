"""Fine-tuning on the downstream tasks through xfusion.train (Supp. B.1): the task stream, a
fine-tuning run from a trained step dir with frozen text weights, its outputs, scores and the
figureA table and panel."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml

from eval.figure_a import main as figure_a
from eval.tasks import TASK_METRICS, first_per_task, score_outputs
from test_train import world  # noqa: F401  (the module-scoped tiny world fixture)
from xfusion.codec import build_codec
from xfusion.config import FINETUNE_TASKS, apply_overrides, finetune_config, load_run, load_yaml
from xfusion.config import recipe_hash
from xfusion.data.task_stream import TaskStream
from xfusion.data.tasks import generate_tasks
from xfusion.data.world import write_split
from xfusion.io import read_jsonl
from xfusion.model import XFusionModel
from xfusion.model.base import text_weight_hash
from xfusion.sample_tasks import predict_tasks
from xfusion.tokenizer import load_tokenizer
from xfusion.train import parse_args, train

FT = {"finetune.steps": 4, "finetune.batch_size": 4, "finetune.warmup_steps": 1,
      "finetune.n_eval": 2, "data.max_shapes": 3, "evaluation.sample_steps": 2,
      "evaluation.sample_batch_size": 4}


@pytest.fixture(scope="module")
def finetuned(world) -> dict:  # noqa: F811
    R = world["R"]
    raw = apply_overrides(load_yaml(world["config"]), {"training.steps": 2,
                                                       "training.eval_steps": [2], **FT})
    config = R / "finetune.yaml"
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    cfg = load_run(config, "dual_tower")
    write_split(R / "world", "heldout", 8, cfg.data, cfg.seed)
    generate_tasks(R / "tasks", cfg.data.image_size, cfg.seed, world=R / "world")
    run = R / "runs" / "dual_tower"
    train(parse_args(["--config", str(config), "--run", "dual_tower", "--base-lm",
                      str(world["base_lm"]), "--latents", str(world["latents"]), "--captions",
                      str(world["captions"]), "--out", str(run)]))
    out = R / "finetune" / "dual_tower"
    train(parse_args(["--config", str(config), "--run", "dual_tower", "--init",
                      str(run / "steps" / "2"), "--tasks",
                      str(R / "tasks" / "train" / "tasks.jsonl"), "--out", str(out)]))
    return {"config": config, "cfg": cfg, "R": R, "init": run / "steps" / "2", "out": out}


def test_task_stream_mixes_tasks_by_ratio_and_is_addressed_by_step(finetuned):
    cfg = finetune_config(finetuned["cfg"])
    tok = load_tokenizer(finetuned["R"] / "tokenizer")
    tasks = finetuned["R"] / "tasks" / "train" / "tasks.jsonl"
    codec = build_codec(cfg.model.codec)
    stream = TaskStream(tasks, tok, cfg, codec)
    a, plan = stream.batch(3)
    b, _ = stream.batch(3)
    assert [s.task for s in a] == [s.task for s in b]
    assert all(torch.equal(x.latents, y.latents) for x, y in zip(a, b))
    assert torch.equal(stream.noise(3), stream.noise(3))
    counts = torch.bincount(torch.cat([stream.plan(s).task for s in range(50)]),
                            minlength=len(FINETUNE_TASKS))
    assert (counts > 0.15 * counts.sum()).all()  # every task, about a quarter each
    only = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune,
                                                                 task_ratios={"vqa": 1.0}))
    vqa = TaskStream(tasks, tok, only, codec)
    assert {s.task for s in vqa.batch(0)[0]} == {"vqa"}
    assert plan.t2i_tokens + plan.i2t_tokens > 0


def test_finetuning_trains_the_image_side_and_keeps_text_weights(finetuned):
    out, init = finetuned["out"], finetuned["init"]
    done = json.loads((out / "done.json").read_text())
    base = json.loads((init / "base_model.json").read_text())["text_weight_hash"]
    assert done["text_weight_hash"] == base  # frozen text tower: MMLU unchanged
    cfg = finetuned["cfg"]  # the run's own config: the init's training recipe + finetune
    assert done["recipe"] == recipe_hash(cfg, "finetune_run") != recipe_hash(cfg, "train_run")
    log = read_jsonl(out / "train_log.jsonl")
    assert len(log) == 4 and all(r["ar_loss"] > 0 and r["dm_loss"] > 0 for r in log)
    before = XFusionModel.load(init)
    after = XFusionModel.load(out / "steps" / "4")
    assert text_weight_hash(after.llm) == base
    moved = [n for n, p in after.named_parameters() if p.requires_grad
             and not torch.equal(p, dict(before.named_parameters())[n])]
    assert moved


def test_outputs_scores_and_figure_a(finetuned, tmp_path):
    R, cfg = finetuned["R"], finetuned["cfg"]
    jsonl = R / "tasks" / "heldout" / "tasks.jsonl"
    rows = first_per_task(read_jsonl(jsonl), cfg.finetune.n_eval)
    assert {r["task"] for r in rows} == set(FINETUNE_TASKS)
    scores = {}
    for stage, model_dir in (("before", finetuned["init"]),
                             ("after", finetuned["out"] / "steps" / "4")):
        model = XFusionModel.load(model_dir).eval()
        outputs = predict_tasks(model, rows, jsonl, cfg.evaluation, cfg.seed, tmp_path / stage)
        again = predict_tasks(model, rows, jsonl, cfg.evaluation, cfg.seed, tmp_path / "again")
        assert [o["output"] for o in outputs if o["task"] in ("vqa", "localisation")] == \
               [o["output"] for o in again if o["task"] in ("vqa", "localisation")]
        metrics, examples = score_outputs(rows, outputs, jsonl, cfg.data.image_size)
        assert metrics["edit_pixel_error"] > 0 and metrics["paint_masked_error"] > 0
        assert 0 <= metrics["loc_iou"] <= 1 and 0 <= metrics["vqa_exact_match"] <= 1
        path = tmp_path / f"{stage}.json"
        path.write_text(json.dumps({"metrics": metrics, "examples": examples,
                                    "n": {t: cfg.finetune.n_eval for t in FINETUNE_TASKS}}))
        scores[stage] = path
    # the truth as the output scores perfectly
    perfect = [{"id": r["id"], "task": r["task"], "output": r["answer"] or str(
        (jsonl.parent.parent.parent / r["target"]).resolve())} for r in rows]
    best, _ = score_outputs(rows, perfect, jsonl, cfg.data.image_size)
    assert best["edit_pixel_error"] == 0 and best["paint_masked_error"] == 0
    assert best["loc_iou"] == 1 and best["vqa_exact_match"] == 1
    table = figure_a(["--before", str(scores["before"]), "--after", str(scores["after"]),
                      "--tasks", str(jsonl), "--csv", str(tmp_path / "figureA.csv"),
                      "--panel", str(tmp_path / "figureA.png")])
    assert [r["metric"] for r in table] == list(TASK_METRICS)
    assert (tmp_path / "figureA.png").stat().st_size > 0
    assert Path(tmp_path / "figureA.csv").read_text().startswith("metric,task,before,after")
