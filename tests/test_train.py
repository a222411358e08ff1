"""xfusion.train end to end on a tiny world: resume after SIGKILL is bitwise exact, the loss goes
down with frozen text weights untouched, MLflow holds the run, failures stop or warn cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from conftest import LAUNCHER_VARIABLES
from xfusion import checkpoint, train
from xfusion.caption import caption_file
from xfusion.codec import build_codec
from xfusion.config import apply_overrides, experiments_using, load_run, load_yaml, resolve_run
from xfusion.config import train_recipe
from xfusion.data import resolve_image
from xfusion.data.mixing import MixedStream, read_captions
from xfusion.data.world import write_split
from xfusion.io import read_jsonl
from xfusion.latents import encode_images, load_latents, save_latents
from xfusion.model import LossOutput, XFusionModel
from xfusion.model.base import build_tiny_llama, text_weight_hash
from xfusion.tokenizer import load_tokenizer, train_bpe
from xfusion.tracking import tracking_uri

REPO = Path(__file__).resolve().parents[1]
STEPS = 12
OVERRIDES = {
    "data.n_train": 24,
    "data.max_caption_tokens": 24,
    "model.base_lm.tiny": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                           "num_key_value_heads": 2, "intermediate_size": 64,
                           "max_position_embeddings": 128},
    "training.steps": STEPS,
    "training.tokens_per_batch": 4 * (16 + 24 + 4),  # 4 samples of up to 44 tokens
    "training.lr": 3e-3,
    "training.warmup_steps": 2,
    "training.checkpoint_every": 3,
    "training.keep_last": 2,
    "training.eval_steps": [6, STEPS],
    "training.log_every": 1,
}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A tiny world built with the data stage's own code: images, captions, tokenizer, latents,
    and a random 2-layer base Llama with its base_model.json (pretraining is not under test)."""
    root = tmp_path_factory.mktemp("tiny")
    config = root / "tiny.yaml"
    raw = apply_overrides(load_yaml(REPO / "config/tiny.yaml"), OVERRIDES)
    config.write_text(yaml.safe_dump(raw, sort_keys=False))  # experiment order matters
    cfg = load_run(config, "dual_tower")
    R = root / "results"
    write_split(R / "world", "train", cfg.data.n_train, cfg.data, cfg.seed)
    captions = R / "captions" / "train.jsonl"
    caption_file(R / "world" / "train" / "scenes.jsonl", captions, cfg.data.captioner, "stop")
    rows = read_jsonl(captions)
    tok = train_bpe([r["caption"] for r in rows], vocab_size=300)
    tok.save_pretrained(R / "tokenizer")
    tok = load_tokenizer(R / "tokenizer")
    latents = encode_images([resolve_image(r["image"], captions) for r in rows],
                            build_codec(cfg.model.codec), cfg.data.image_size, 16,
                            torch.device("cpu"))
    save_latents(R / "latents" / "train.safetensors", latents, [r["id"] for r in rows], {})
    torch.manual_seed(0)
    llm = build_tiny_llama(cfg.model.base_lm.tiny, len(tok), tok.bos_token_id, tok.eos_token_id,
                           tok.pad_token_id)
    base = R / "base_lm" / "tiny_base"
    llm.save_pretrained(base / "hf")
    tok.save_pretrained(base / "hf")
    (base / "base_model.json").write_text(json.dumps(
        {"path": "hf", "tokenizer": "hf", "text_weight_hash": text_weight_hash(llm)}))
    return {"config": config, "R": R, "base_lm": base / "base_model.json",
            "latents": R / "latents" / "train.safetensors", "captions": captions}


def _argv(world: dict, out: Path, run: str = "dual_tower") -> list[str]:
    return ["--config", str(world["config"]), "--run", run, "--base-lm", str(world["base_lm"]),
            "--latents", str(world["latents"]), "--captions", str(world["captions"]),
            "--out", str(out)]


def _subprocess(world: dict, out: Path) -> subprocess.Popen:
    # A fresh single-process job: drop the rendezvous variables that an in-process run (an
    # earlier test) exported, whose MASTER_PORT that process still holds.
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "xfusion.train", *_argv(world, out)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _finish(proc: subprocess.Popen) -> str:
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    return output


def test_stream_is_addressed_by_step_and_mixes_by_ratio(world):
    cfg = load_run(world["config"], "dual_tower")
    latents, ids = load_latents(world["latents"])
    tok = load_tokenizer(world["R"] / "tokenizer")
    stream = MixedStream(latents, read_captions(world["captions"], ids), tok, cfg)
    assert stream.seq_len == 16 + 24 + 4 and stream.batch_size == 4
    again = MixedStream(latents, read_captions(world["captions"], ids), tok, cfg)
    later, _ = again.batch(7)  # straight to step 7, as a resumed run does
    for step in range(8):
        samples, plan = stream.batch(step)
    assert [(s.task, s.t, s.caption_ids) for s in samples] == [
        (s.task, s.t, s.caption_ids) for s in later]
    plans = [stream.plan(s) for s in range(300)]
    t2i = torch.cat([p.is_t2i for p in plans]).float().mean().item()
    assert abs(t2i - cfg.training.t2i_ratio) < 0.05
    assert all(p.t2i_tokens + p.i2t_tokens <= cfg.training.tokens_per_batch for p in plans)
    clean = torch.cat([p.t[~p.is_t2i] for p in plans])
    assert torch.all(clean == 0)  # i2t_noise_max 0: clean images for captioning
    epoch = torch.cat([p.index for p in plans[:6]])  # 6 batches of 4 = one pass over 24 images
    assert sorted(epoch.tolist()) == list(range(24))


def test_stream_draws_noisy_i2t_times_from_the_truncated_t2i_distribution(world, tmp_path):
    """training.i2t_noise_max 0.5 with logit-normal(m, s) T2I times: I2T t in [0, 0.5], with the
    median of the logit-normal truncated there, sigmoid(m + s Phi^-1(Phi(-m / s) / 2)) (0.337 at
    SD3's m = 0, s = 1), not uniform's 0.25."""
    raw = apply_overrides(load_yaml(world["config"]), {"training.i2t_noise_max": 0.5})
    config = tmp_path / "noisy.yaml"
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    cfg = load_run(config, "dual_tower")
    latents, ids = load_latents(world["latents"])
    stream = MixedStream(latents, read_captions(world["captions"], ids),
                         load_tokenizer(world["R"] / "tokenizer"), cfg)
    plans = [stream.plan(s) for s in range(400)]
    t = torch.cat([p.t[~p.is_t2i] for p in plans])
    assert len(t) > 400 and (t > 0).all() and (t <= 0.5).all()
    m, s = cfg.training.timestep_logit_mean, cfg.training.timestep_logit_std
    half = torch.special.ndtr(torch.tensor(-m / s)) / 2  # F(0.5) / 2, as logit(0.5) = 0
    median = torch.sigmoid(m + s * torch.special.ndtri(half)).item()
    assert abs(t.median().item() - median) < 0.03


def test_sigkill_then_rerun_ends_bitwise_equal_to_uninterrupted_run(world, tmp_path):
    full = tmp_path / "full" / "runs" / "dual_tower"
    _finish(_subprocess(world, full))

    killed = tmp_path / "killed" / "runs" / "dual_tower"
    proc = _subprocess(world, killed)
    deadline = time.time() + 300
    while checkpoint.latest(killed / "checkpoints") is None and proc.poll() is None:
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "done.json").exists(), "the run finished before it could be killed"
    output = _finish(_subprocess(world, killed))
    assert "resuming dual_tower" in output

    for step in (6, STEPS):
        a = load_file(str(full / "steps" / str(step) / "trainable.safetensors"))
        b = load_file(str(killed / "steps" / str(step) / "trainable.safetensors"))
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), (step, name)
    log = [r["step"] for r in read_jsonl(killed / "train_log.jsonl")]
    assert log == list(range(1, STEPS + 1))  # rows past the checkpoint were dropped, not doubled
    last_killed, last_full = (read_jsonl(d / "train_log.jsonl")[-1] for d in (killed, full))
    last_killed.pop("tokens_per_s"), last_full.pop("tokens_per_s")  # wall-clock, not state
    assert last_killed == last_full
    assert [s for s, _ in checkpoint.step_dirs(killed / "checkpoints")] == [6, 9]  # keep_last 2


def test_dual_tower_loss_decreases_and_text_weights_stay_identical(world, tmp_path):
    out = tmp_path / "R" / "runs" / "dual_tower"
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    done = train.train(train.parse_args(_argv(world, out)))
    log = read_jsonl(out / "train_log.jsonl")
    assert set(log[0]) == set(train.LOG_FIELDS)
    first, last = (sum(r["loss"] for r in rows) / 3 for rows in (log[:3], log[-3:]))
    assert last < first
    assert log[-1]["t2i_tokens_seen"] > 0 and log[-1]["i2t_tokens_seen"] > 0
    base_hash = json.loads(world["base_lm"].read_text())["text_weight_hash"]
    assert done["text_weight_hash"] == base_hash  # measured on the trained model in memory
    saved = load_file(str(out / "steps" / str(STEPS) / "trainable.safetensors"))
    assert not any(name.startswith("llm.") for name in saved)  # the text tower is not trained
    model = XFusionModel.load(out / "steps" / str(STEPS))
    assert model.architecture == "dual_tower"

    # MLflow: experiment "table1" (the first group declaring dual_tower) holds the run.
    client = MlflowClient(tracking_uri(out))
    exp = client.get_experiment_by_name("table1")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name == "dual_tower"
    assert run.info.run_id == (out / "mlflow_run_id.txt").read_text().strip()
    assert run.data.params["model.architecture"] == "dual_tower"
    assert len(client.get_metric_history(run.info.run_id, "loss")) == STEPS
    # It lives in one experiment, but every experiment declaring dual_tower finds it by tag.
    raw = load_yaml(world["config"])
    users = experiments_using(raw, "dual_tower")
    assert len(users) > 1 and run.data.tags["xfusion.experiments"] == ",".join(users)
    everywhere = [e.experiment_id for e in client.search_experiments()]
    for name in users:
        found = client.search_runs(everywhere, f"tags.`xfusion.experiment.{name}` = '1'")
        assert [r.info.run_id for r in found] == [run.info.run_id], name
    assert run.data.tags["xfusion.recipe"] == done["recipe"]


def test_nan_loss_stops_with_clear_error_and_keeps_last_good_checkpoint(world, tmp_path,
                                                                      monkeypatch):
    original = XFusionModel.compute_loss
    calls = {"n": 0}

    def nan_at_step_5(self, batch):
        calls["n"] += 1
        out = original(self, batch)
        return out if calls["n"] < 5 else LossOutput(out.loss * float("nan"), *out[1:])

    monkeypatch.setattr(XFusionModel, "compute_loss", nan_at_step_5)
    out = tmp_path / "R" / "runs" / "dual_tower"
    with pytest.raises(FloatingPointError, match=r"step 5: loss is nan.*Last good checkpoint: "
                                                 r".*step_3"):
        train.train(train.parse_args(_argv(world, out)))
    assert checkpoint.latest(out / "checkpoints").name == "step_3"
    assert not (out / "done.json").exists()


def test_unwritable_mlflow_store_warns_once_and_training_completes(world, tmp_path, monkeypatch):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{blocker}/mlruns.db")
    out = tmp_path / "R" / "runs" / "dual_tower"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train.train(train.parse_args(_argv(world, out)))
    assert (out / "done.json").is_file()
    assert len([w for w in caught if "MLflow tracking disabled" in str(w.message)]) == 1


def _clip_judge(path: Path, width: int) -> None:
    """A tiny transformers CLIP (what python -m eval.judges saves under R/judges/clip)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    small = dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                 num_attention_heads=2)
    config = CLIPConfig(text_config=dict(vocab_size=32, **small),
                        vision_config=dict(image_size=32, patch_size=4, **small),
                        projection_dim=width)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
                       ).save_pretrained(path)


def test_repa_targets_come_from_the_clip_judge_once_per_image(world, tmp_path, monkeypatch):
    judges = tmp_path / "judges"
    _clip_judge(judges / "clip", width=16)
    raw = apply_overrides(load_yaml(world["config"]), {"model.repa.feature_dim": 16,
                                                       "model.repa.encoder": "judge_clip"})
    config = tmp_path / "repa.yaml"
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    out = tmp_path / "R" / "runs" / "size_m_align_on"
    argv = _argv({**world, "config": config}, out, run="size_m_align_on")
    train.train(train.parse_args(argv + ["--judges", str(judges)]))

    log = read_jsonl(out / "train_log.jsonl")
    assert all(r["repa_loss"] > 0 for r in log)
    targets = load_file(str(out / "repa_targets.safetensors"))["targets"]
    assert targets.shape == (24, 16, 16)  # (images, 4x4 image tokens, CLIP width)

    # Cached beside the run: a second use never runs the encoder.
    monkeypatch.setattr(train, "encode_repa_targets", lambda *a, **k: pytest.fail("recomputed"))
    cfg = load_run(config, "size_m_align_on")
    _, ids = load_latents(world["latents"])
    again = train.repa_targets(cfg, judges, world["captions"], ids, (8, 8),
                               out / "repa_targets.safetensors")
    assert torch.equal(again, targets)

    wrong = apply_overrides(raw, {"model.repa.feature_dim": 64})  # not the judge's 16
    wrong = resolve_run(wrong, "size_m_align_on")
    with pytest.raises(SystemExit, match=r"feature_dim = 64, but .* width 16: set it to 16"):
        train.repa_targets(wrong, judges, world["captions"], ids, (8, 8),
                           out / "repa_targets.safetensors")


def test_repa_with_the_align_encoder_trains_toward_its_penultimate_features(world, tmp_path):
    """The tiny default target: xfusion.align_encoder's ViT, trained by its entry point (the DAG
    gives it the world's align split; the fixture's train split stands in for it here), read
    through --align-encoder (never --judges) in a real training run."""
    from xfusion import align_encoder

    raw = apply_overrides(load_yaml(world["config"]), {
        "model.repa.feature_dim": 16, "model.repa.align": {"steps": 2, "batch_size": 8}})
    config = tmp_path / "repa.yaml"
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert load_run(config, "size_m_align_on").model.repa.encoder == "align_encoder"
    encoder = tmp_path / "align_encoder"
    scenes = world["R"] / "world" / "train" / "scenes.jsonl"
    align_encoder.main(["--config", str(config), "--scenes", str(scenes),
                        "--out", str(encoder)])
    out = tmp_path / "R" / "runs" / "size_m_align_on"
    argv = _argv({**world, "config": config}, out, run="size_m_align_on")
    with pytest.raises(SystemExit, match="needs --align-encoder R/align_encoder"):
        train.train(train.parse_args(argv))
    train.train(train.parse_args(argv + ["--align-encoder", str(encoder)]))
    log = read_jsonl(out / "train_log.jsonl")
    assert log and all(r["repa_loss"] > 0 for r in log)
    targets = load_file(str(out / "repa_targets.safetensors"))["targets"]
    assert targets.shape == (24, 16, 16)  # (images, 4x4 image tokens, encoder width)
    _, ids = load_latents(world["latents"])
    image = {r["id"]: r["image"] for r in read_jsonl(world["captions"])}
    direct = train.encode_repa_targets(
        str(encoder), [resolve_image(image[i], world["captions"]) for i in ids], (4, 4))
    assert torch.allclose(direct, targets)  # the encoder's own penultimate patch features


def _files(root: Path) -> dict[Path, bytes]:
    return {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_resume_after_a_recipe_change_sets_the_old_run_aside_and_trains_afresh(world, tmp_path):
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    out = tmp_path / "R" / "runs" / "dual_tower"
    train.train(train.parse_args(_argv(world, out)))
    old = train_recipe(load_run(world["config"], "dual_tower"))
    assert json.loads((out / "done.json").read_text())["recipe"] == old
    assert json.loads((out / "steps" / "6" / "recipe.json").read_text())["recipe"] == old
    for _, ckpt in checkpoint.step_dirs(out / "checkpoints"):
        assert json.loads((ckpt / "meta.json").read_text())["recipe"] == old
    old_id = (out / "mlflow_run_id.txt").read_text().strip()
    # The train rule's params changed: Snakemake deletes its output, done.json, and reruns it
    # on the checkpoints of the old recipe.
    (out / "done.json").unlink()
    before = _files(out)

    changed = tmp_path / "changed.yaml"
    raw = apply_overrides(load_yaml(world["config"]), {"training.t2i_ratio": 0.5})
    changed.write_text(yaml.safe_dump(raw, sort_keys=False))
    done = train.train(train.parse_args(_argv({**world, "config": changed}, out)))
    new = train_recipe(load_run(changed, "dual_tower"))
    assert new != old and done["recipe"] == new

    # The old run's files, intact, under superseded/<old hash>/; nothing deleted.
    assert _files(out / "superseded" / old) == before
    assert sorted(p.name for p in (out / "superseded").iterdir()) == [old]
    # The new recipe trained from step 0, with its own files.
    assert [r["step"] for r in read_jsonl(out / "train_log.jsonl")] == list(range(1, STEPS + 1))
    assert json.loads((out / "recipe.json").read_text())["recipe"] == new
    assert json.loads((out / "steps" / "6" / "recipe.json").read_text())["recipe"] == new
    assert (out / "steps" / "6" / "trainable.safetensors").read_bytes() != before[
        Path("steps/6/trainable.safetensors")]

    # MLflow: a new run for the new recipe; the old one kept and tagged superseded.
    client = MlflowClient(tracking_uri(out))
    new_id = (out / "mlflow_run_id.txt").read_text().strip()
    assert new_id != old_id
    old_run, new_run = client.get_run(old_id), client.get_run(new_id)
    assert old_run.data.tags["xfusion.recipe"] == old and new_run.data.tags["xfusion.recipe"] == new
    assert old_run.data.tags["xfusion.superseded"] == "1"
    assert old_run.data.tags["xfusion.superseded_by"] == new
    assert old_run.data.tags["xfusion.superseded_to"] == str(out / "superseded" / old)
    assert "xfusion.superseded" not in new_run.data.tags
    assert [m.step for m in client.get_metric_history(new_id, "loss")] == list(range(1, STEPS + 1))

    # The same recipe again: already trained, nothing moved.
    train.train(train.parse_args(_argv({**world, "config": changed}, out)))
    assert sorted(p.name for p in (out / "superseded").iterdir()) == [old]


class Killed(BaseException):
    """A kill at a chosen point of an in-process run (BaseException: no handler catches it)."""


def _log_rows(out: Path) -> list[dict]:
    # tokens_per_s is wall-clock, not state: every other field is bitwise on CPU fp32 resume
    return [{k: v for k, v in r.items() if k != "tokens_per_s"}
            for r in read_jsonl(out / "train_log.jsonl")]


@pytest.fixture(scope="module")
def uninterrupted_log(world, tmp_path_factory) -> list[dict]:
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    out = tmp_path_factory.mktemp("uninterrupted") / "runs" / "dual_tower"
    train.train(train.parse_args(_argv(world, out)))
    return _log_rows(out)


@pytest.mark.parametrize("point", ["before the first checkpoint", "just after a checkpoint",
                                   "mid-way", "mid-way, in the middle of a log write"])
def test_a_rerun_after_a_kill_leaves_the_uninterrupted_log(world, tmp_path, monkeypatch,
                                                           uninterrupted_log, point):
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    out = tmp_path / "R" / "runs" / "dual_tower"
    # checkpoint_every 3, log_every 1: "before" dies in step 3 with rows 1-2 and no checkpoint;
    # "just after" right after checkpoint 6 is written (before steps/6); "mid-way" in step 9.
    rows_at_kill = {"before the first checkpoint": 2, "mid-way": 8,
                    "mid-way, in the middle of a log write": 8}.get(point)
    with monkeypatch.context() as patch:
        if rows_at_kill is None:
            save = checkpoint.save

            def save_then_die(root, step, **kwargs):
                save(root, step, **kwargs)
                if step == 6:
                    raise Killed

            patch.setattr(checkpoint, "save", save_then_die)
        else:
            compute_loss = XFusionModel.compute_loss

            def die_at_row(self, batch):
                log = out / "train_log.jsonl"
                if log.is_file() and len(read_jsonl(log)) == rows_at_kill:
                    raise Killed
                return compute_loss(self, batch)

            patch.setattr(XFusionModel, "compute_loss", die_at_row)
        with pytest.raises(Killed):
            train.train(train.parse_args(_argv(world, out)))
    killed_log = _log_rows(out)
    assert killed_log == uninterrupted_log[:len(killed_log)] and not (out / "done.json").exists()
    if point.endswith("log write"):  # the row of step 9, cut short by the kill
        with open(out / "train_log.jsonl", "a") as fh:
            fh.write('{"step": 9, "loss": 0.4')
    if point == "before the first checkpoint":
        assert checkpoint.latest(out / "checkpoints") is None and len(killed_log) == 2

    train.train(train.parse_args(_argv(world, out)))
    assert _log_rows(out) == uninterrupted_log
    assert [r["step"] for r in uninterrupted_log] == list(range(1, STEPS + 1))
