"""Train one X-Fusion variant on stored latents: a flat loop, the engine applied from outside.

`python -m xfusion.train --config C --run RUN --base-lm R/base_lm/<name>/base_model.json --latents R/latents/train.safetensors --captions R/captions/train.jsonl [--judges R/judges] [--align-encoder R/align_encoder] [--dit R/dit/<name>/dit_model.json] --out R/runs/RUN`

Writes into `--out` (docs/INTERFACES.md): `recipe.json` (the train recipe hash and the values
it covers), `steps/<step>/` (a model dir per `training.eval_steps`), `checkpoints/step_<N>/` (every
`training.checkpoint_every` steps, last `keep_last` kept), `train_log.jsonl` (every `log_every`
steps), `mlflow_run_id.txt`, `repa_targets.safetensors` (REPA runs: encoder features, computed
once per image) and finally `done.json`.

Resume is automatic: rerunning the same command after a kill (SIGTERM or SIGKILL) continues from
the newest complete checkpoint. Model weights, optimizer, LR schedule, RNG states and the data
position (the stream is addressed by step) all come back, so on CPU in fp32 the final weights are
bitwise those of an uninterrupted run; `train_log.jsonl` is cut back to the rows up to the step
resumed from (none without a checkpoint), so after a kill at any point it ends as an
uninterrupted run's. A non-finite loss stops the run before the update, with the last good
checkpoint left in place.

Fine-tuning (X-Fusion Supp. B.1): `--init R/runs/RUN/steps/STEP --tasks R/tasks/train/tasks.jsonl`
(no --base-lm, --latents, --captions: the model dir names its base LLM) starts from a trained
model dir and trains on the downstream tasks (xfusion.data.task_stream) with the training
section `finetune_config` derives from `finetune` (steps, lr, warm-up; one step dir at the end).
The run's recipe is `finetune_run`'s hash; the frozen text weights are checked as in training.

Resume never crosses recipes: a run dir holds the files of one train recipe
(xfusion.config.train_recipe). Files of another are moved, intact, to
`superseded/<their hash>/`, their MLflow run is tagged superseded, and training starts from step
0 in a new MLflow run. Nothing is deleted.

References: nanoGPT train.py (flat loop: setup, data, model, optimizer, loop, checkpoint);
DiT train.py; X-Fusion Sec. 4 (recipe), Supp. A (REPA).
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from xfusion import checkpoint
from xfusion.codec import build_codec
from xfusion.config import ALIGN_ENCODER, RECIPE_FILE, VARIANTS, RunConfig, load_run, load_yaml
from xfusion.config import finetune_config, recipe_hash, recipe_record
from xfusion.data.mixing import MixedStream, read_captions
from xfusion.data.task_stream import TaskStream
from xfusion.engine import Engine, rank, setup_distributed, shutdown_distributed, world_size
from xfusion.io import atomic_write_json, atomic_write_jsonl, read_jsonl
from xfusion.latents import load_latents
from xfusion.model import XFusionModel
from xfusion.model.base import load_base_llm, text_weight_hash
from xfusion.model.dit import load_dit_json_
from xfusion.tracking import experiment_of, experiment_tags, mark_superseded, start_run

SUPERSEDED = "superseded"  # R/runs/RUN/superseded/<hash>/: the files of earlier recipes
LOG_FIELDS = ("step", "loss", "ar_loss", "dm_loss", "repa_loss", "lr", "grad_norm",
              "tokens_per_s", "t2i_tokens_seen", "i2t_tokens_seen")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="config/<scale>.yaml")
    p.add_argument("--run", required=True, help="a run of config.experiments")
    p.add_argument("--base-lm", type=Path, help="R/base_lm/<name>/base_model.json")
    p.add_argument("--latents", type=Path, help="R/latents/train.safetensors")
    p.add_argument("--captions", type=Path, help="R/captions/train.jsonl")
    p.add_argument("--init", type=Path, default=None,
                   help="fine-tuning: the trained model dir to start from (R/runs/RUN/steps/STEP)")
    p.add_argument("--tasks", type=Path, default=None,
                   help="fine-tuning: R/tasks/train/tasks.jsonl (python -m xfusion.data.tasks)")
    p.add_argument("--judges", type=Path, default=None,
                   help="R/judges (tiny REPA with model.repa.encoder: judge_clip)")
    p.add_argument("--align-encoder", type=Path, default=None,
                   help="R/align_encoder (tiny REPA with model.repa.encoder: align_encoder)")
    p.add_argument("--dit", type=Path, default=None,
                   help="R/dit/<name>/dit_model.json (x_fuse_dit: its vision tower's DiT)")
    p.add_argument("--experiment", default=None,
                   help="MLflow experiment (default: the first config experiment with this run)")
    p.add_argument("--out", required=True, type=Path, help="R/runs/RUN")
    args = p.parse_args(argv)
    need = ("init", "tasks") if args.init or args.tasks else ("base_lm", "latents", "captions")
    missing = [f"--{n.replace('_', '-')}" for n in need if getattr(args, n) is None]
    if missing:
        p.error(f"{'fine-tuning' if args.init or args.tasks else 'training'} needs "
                f"{', '.join(missing)}")
    return args


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_base_ref(base_model_json: Path) -> dict:
    """base_model.json with its paths made absolute where they are relative to the json's own
    directory: the step model dirs copy this dict, and there a relative path would break."""
    ref = json.loads(base_model_json.read_text())
    for key in ("path", "tokenizer"):
        local = base_model_json.parent / ref[key]
        if not Path(ref[key]).exists() and local.exists():
            ref[key] = str(local.resolve())
    return ref


# --- REPA targets: a frozen encoder's features, computed once per image ---------------------------

def repa_encoder_path(cfg: RunConfig, judges: Path | None,
                      align_encoder: Path | None = None) -> str:
    """The REPA encoder's directory or hub id: a pipeline-trained encoder's dir (judge_clip under
    --judges, align_encoder at --align-encoder), else model.repa.encoder_path or the name."""
    repa = cfg.model.repa
    trained = {"judge_clip": (judges and judges / "clip",
                              "--judges R/judges (python -m eval.judges)"),
               ALIGN_ENCODER: (align_encoder,
                               "--align-encoder R/align_encoder (python -m xfusion.align_encoder)")}
    if repa.encoder in trained:
        path, flag = trained[repa.encoder]
        if path is None:
            raise SystemExit(f"config.model.repa.encoder = {repa.encoder!r} needs {flag}")
        return str(path)
    return repa.encoder_path or repa.encoder


@torch.no_grad()
def encode_repa_targets(encoder: str, images: list[Path], grid: tuple[int, int],
                        batch_size: int = 64) -> torch.Tensor:
    """(N, P, F) penultimate CLIP vision features, one per image token: the patch features
    (CLS dropped) average-pooled onto the model's `grid` of image tokens (REPA's per-token
    alignment; at paper scale ViT-L/14 at 224 px gives 16x16 patches, the 256 px / 8 / 2 grid)."""
    from PIL import Image
    from transformers import AutoConfig, AutoImageProcessor, CLIPModel, CLIPVisionModel

    # A vision tower saved alone (align_encoder), or the whole CLIPModel (a judge dir, or a hub
    # CLIP) then its vision tower: loading the vision class alone from a CLIPModel checkpoint
    # works but lists every text weight as unexpected.
    if AutoConfig.from_pretrained(encoder).model_type == "clip_vision_model":
        model = CLIPVisionModel.from_pretrained(encoder).eval()
    else:
        model = CLIPModel.from_pretrained(encoder).vision_model.eval()
    processor = AutoImageProcessor.from_pretrained(encoder)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(dev)
    out = []
    for i in tqdm(range(0, len(images), batch_size), desc="REPA targets", disable=rank() != 0):
        pil = [Image.open(p).convert("RGB") for p in images[i:i + batch_size]]
        pixels = processor(images=pil, return_tensors="pt")["pixel_values"].to(dev)
        hidden = model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        n, patches, dim = hidden.shape
        side = int(round(patches ** 0.5))
        maps = hidden.transpose(1, 2).reshape(n, dim, side, side)  # (n, F, s, s)
        pooled = torch.nn.functional.adaptive_avg_pool2d(maps, grid)  # (n, F, gh, gw)
        out.append(pooled.flatten(2).transpose(1, 2).float().cpu())  # (n, P, F)
    return torch.cat(out)


def repa_targets(cfg: RunConfig, judges: Path | None, captions: Path, ids: list[str],
                 latent_hw: tuple[int, int], cache: Path,
                 align_encoder: Path | None = None) -> torch.Tensor:
    """REPA targets for the training images, from `cache` when it matches, else computed once
    (rank 0) and cached beside the run: the encoder never runs per step."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from xfusion.data import resolve_image
    from xfusion.io import atomic_path

    encoder = repa_encoder_path(cfg, judges, align_encoder)
    p = cfg.model.patch_size
    grid = (latent_hw[0] // p, latent_hw[1] // p)
    key = {"encoder": encoder, "ids": json.dumps(ids), "grid": json.dumps(grid)}
    if rank() == 0 and not _cache_matches(cache, key, safe_open):
        rows = {row["id"]: row["image"] for row in read_jsonl(captions)}
        images = [resolve_image(rows[i], captions) for i in ids]
        feats = encode_repa_targets(encoder, images, grid)
        with atomic_path(cache) as tmp:
            save_file({"targets": feats.contiguous()}, str(tmp), metadata=key)
    if world_size() > 1:
        torch.distributed.barrier()
    with safe_open(str(cache), framework="pt") as fh:
        feats = fh.get_tensor("targets")
    if feats.shape[-1] != cfg.model.repa.feature_dim:
        raise SystemExit(f"config.model.repa.feature_dim = {cfg.model.repa.feature_dim}, but "
                         f"{encoder} gives features of width {feats.shape[-1]}: set it to "
                         f"{feats.shape[-1]}")
    return feats


def _cache_matches(cache: Path, key: dict, safe_open) -> bool:
    if not cache.is_file():
        return False
    with safe_open(str(cache), framework="pt") as fh:
        return (fh.metadata() or {}) == key


# --- one recipe per run dir ----------------------------------------------------------------------

def recorded_recipe(out: Path) -> str | None:
    """The train recipe hash the files in run dir `out` belong to: None when it holds none,
    "unrecorded" for files written before runs recorded their recipe."""
    if (out / RECIPE_FILE).is_file():
        return json.loads((out / RECIPE_FILE).read_text())["recipe"]
    files = [p for p in out.iterdir() if p.name != SUPERSEDED] if out.is_dir() else []
    return "unrecorded" if files else None


def set_aside(out: Path, recipe: str) -> Path | None:
    """Move the files of another recipe in `out` to `out/superseded/<their hash>/`, intact, and
    tag their MLflow run superseded. Returns where they went (None: nothing to move)."""
    old = recorded_recipe(out)
    if old is None or old == recipe:
        return None
    dest, n = out / SUPERSEDED / old, 1
    while dest.exists():  # that recipe was set aside before (A, then B, then A again, then B)
        n += 1
        dest = out / SUPERSEDED / f"{old}.{n}"
    mark_superseded(out, recipe, dest)
    # Through a staging dir named by the old hash and with the record moved last: a move cut
    # short by a kill still finds the old recipe at the next start and finishes into the same dir.
    staging = out / SUPERSEDED / f".{old}.moving"
    staging.mkdir(parents=True, exist_ok=True)
    for path in sorted(out.iterdir(), key=lambda p: p.name == RECIPE_FILE):
        if path.name != SUPERSEDED:
            path.rename(staging / path.name)
    staging.rename(dest)
    print(f"{out}: its files belong to train recipe {old}, not this run's {recipe}: moved them "
          f"intact to {dest} (see {RECIPE_FILE} there for what differs); training starts at step 0")
    return dest


def missing_steps(out: Path, eval_steps) -> list[int]:
    """The eval steps whose model dir `out/steps/<step>` is not written yet."""
    return [s for s in eval_steps if not (out / "steps" / str(s)).is_dir()]


def truncate_log(path: Path, start: int) -> None:
    """Keep the rows of the log at `path` up to step `start`, the step resumed from (0: no
    checkpoint, an empty log), rewritten atomically: the rows a killed run wrote past its last
    checkpoint are written again by the rerun, so they must not stay. A kill during a write
    leaves a last line cut short; it goes too (lines are appended, so only the last can be)."""
    if not path.is_file():
        return
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break
        if row["step"] > start:
            break
        rows.append(row)
    atomic_write_jsonl(path, rows)


# --- the run ------------------------------------------------------------------------------------

def finetune_model(cfg: RunConfig, init: Path) -> XFusionModel:
    """The trained model dir `init` on its base LLM, set to train with `cfg` (finetune_config)."""
    model = XFusionModel.load(init, architecture=cfg.model.architecture)
    if model.cfg.model != cfg.model:
        raise SystemExit(f"{init}: its model section differs from run {cfg.name}'s; fine-tune "
                         "the step dir of the run config.finetune.run names")
    if cfg.model.repa.enabled:
        raise SystemExit(f"run {cfg.name}: fine-tuning on the tasks has no REPA targets; "
                         "fine-tune a run with model.repa.enabled false")
    model.cfg = cfg  # its loss weights and the recipe its step dir records
    return model


def trained_text_hash(llm: torch.nn.Module, base_hash: str, precision: str) -> str:
    """The hash the frozen text weights must have after training. DeepSpeed's bf16 casts the whole
    module, frozen weights included (mixed-dtype matmuls would fail otherwise): a no-op for a
    base stored in bf16 (Llama-3 checkpoints), so there the base hash holds; a base stored in
    another dtype (the tiny fp32 Llama) must equal the base cast to bf16 (deterministic
    round-to-nearest), hashed here before training."""
    floating = [v for v in llm.state_dict().values() if v.is_floating_point()]
    if precision != "bf16" or all(v.dtype == torch.bfloat16 for v in floating):
        return base_hash
    return text_weight_hash(copy.deepcopy(llm).to(torch.bfloat16))


def train(args: argparse.Namespace) -> dict:
    # Setup: config, distributed, seeds, output dir.
    cfg = load_run(args.config, args.run)
    finetuning = args.init is not None
    job = "finetune_run" if finetuning else "train_run"
    # Fine-tuning's recipe: the run's own (what its init step dir was trained with) + finetune.
    recipe, record = recipe_hash(cfg, job), recipe_record(cfg, job)
    if finetuning:  # Supp. B.1: the training section derived from `finetune`
        cfg = finetune_config(cfg)
    t = cfg.training
    out: Path = args.out
    if ((out / "done.json").is_file() and recorded_recipe(out) == recipe
            and not missing_steps(out, t.eval_steps)):
        print(f"{out}: already trained (done.json exists)")
        return json.loads((out / "done.json").read_text())
    setup_distributed()
    seed_everything(t.seed)
    if rank() == 0:  # a run dir holds one recipe: resume never crosses two
        set_aside(out, recipe)
        atomic_write_json(out / RECIPE_FILE, record)
    if world_size() > 1:  # no rank looks for checkpoints before the files are in place
        torch.distributed.barrier()

    # Model: the frozen base LLM wrapped as the variant (fine-tuning: a trained model dir).
    if finetuning:
        model = finetune_model(cfg, args.init)
        llm, tokenizer, base_ref = model.llm, model.tokenizer, model.base_ref
    else:
        base_ref = resolve_base_ref(args.base_lm)
        llm, tokenizer = load_base_llm(args.base_lm)
        if text_weight_hash(llm) != base_ref["text_weight_hash"]:
            raise SystemExit(f"{args.base_lm}: the weights at {base_ref['path']} do not hash to "
                             "its text_weight_hash; rerun python -m xfusion.pretrain_lm")
        model = XFusionModel.from_base(cfg, llm, tokenizer, base_ref=base_ref)
        if VARIANTS[cfg.model.architecture].dit:  # the vision tower starts as a pretrained DiT's
            if args.dit is None:
                raise SystemExit(f"run {cfg.name} ({cfg.model.architecture}) needs --dit "
                                 "R/dit/<name>/dit_model.json (python -m xfusion.pretrain_dit)")
            print(f"loaded {load_dit_json_(model, args.dit)} DiT blocks from {args.dit}")

    # Data: stored latents + captions (+ REPA targets), mixed T2I/I2T by step; fine-tuning:
    # the task examples mixed by finetune.task_ratios.
    if finetuning:
        stream = TaskStream(args.tasks, tokenizer, cfg, build_codec(cfg.model.codec), rank(),
                            world_size())
    else:
        latents, ids = load_latents(args.latents)
        captions = read_captions(args.captions, ids)
        feats = (repa_targets(cfg, args.judges, args.captions, ids, tuple(latents.shape[-2:]),
                              out / "repa_targets.safetensors", args.align_encoder)
                 if cfg.model.repa.enabled else None)
        stream = MixedStream(latents, captions, tokenizer, cfg, feats, rank(), world_size())

    # Engine: DeepSpeed ZeRO-2 around the model; AdamW over the trainable groups only.
    expected_hash = trained_text_hash(llm, base_ref["text_weight_hash"], t.precision)
    engine = Engine(model, model.param_groups(t.lr), t, micro_batch_size=stream.batch_size,
                    gradient_accumulation_steps=stream.accumulation)

    # Resume from the newest complete checkpoint, if any, before the first eval step whose model
    # dir is missing (training.eval_steps may have gained one; a kill may fall between a
    # checkpoint and the step dir of the same step).
    identity = {"variant": cfg.model.architecture, "base_model_hash": base_ref["text_weight_hash"],
                "recipe": recipe}
    ckpt_dir, start = out / "checkpoints", 0
    seen = {"t2i_tokens_seen": 0, "i2t_tokens_seen": 0}
    before = min(missing_steps(out, t.eval_steps), default=None)
    if (latest := checkpoint.latest(ckpt_dir, before=before)) is not None:
        ckpt = checkpoint.load(latest, identity)
        engine.load(ckpt.engine_dir)  # trainable weights, optimizer shard, schedule, counters
        checkpoint.set_rng_state(ckpt.rng)
        start = ckpt.step
        seen = {k: ckpt.data[k] for k in seen}
        print(f"resuming {cfg.name} from {latest} (step {start})")
    if rank() == 0:
        truncate_log(out / "train_log.jsonl", start)
    raw = load_yaml(args.config)
    tracker = start_run(out, cfg, args.experiment or experiment_of(raw, cfg.name),
                        enabled=rank() == 0)
    tracker.set_tags({"batch_size": stream.global_batch_size, "world_size": world_size(),
                      "xfusion.recipe": recipe, **experiment_tags(raw, cfg.name)})

    # Loop.
    model.train()
    bar = tqdm(range(start, t.steps), initial=start, total=t.steps, desc=cfg.name,
               disable=rank() != 0)
    interval_tokens, interval_start = 0, time.perf_counter()
    for step in bar:
        # One optimizer step = `stream.accumulation` micro-batches per rank; DeepSpeed updates at
        # the last. Each micro-batch's loss is its own mean (per token for AR, per T2I sample
        # for DM); DeepSpeed divides it by the accumulation steps and averages over ranks, so a
        # step's gradient is the uniform mean over its W x A equal-sized micro-batches: equal to
        # one batch of all samples when every micro-batch has the same denominators (e.g. all
        # T2I), else a weighting by micro-batch, as data-parallel training usually is.
        micro_losses = []
        for micro in range(stream.accumulation):
            samples, plan = stream.batch(step, micro)
            # Per-sample noise from the stream: a sample's noise depends on its global index
            # only, whichever rank or micro-batch holds it.
            batch = model.build_batch(samples, noise=stream.noise(step, micro))
            losses = model.compute_loss(batch)
            if not torch.isfinite(losses.loss):
                tracker.finish("FAILED")
                raise FloatingPointError(
                    f"{cfg.name} step {step + 1}: loss is {losses.loss.item()} (ar "
                    f"{losses.ar_loss.item()}, dm {losses.dm_loss.item()}, repa "
                    f"{losses.repa_loss.item()}); stopped before "
                    f"the update. Last good checkpoint: {checkpoint.latest(ckpt_dir)}")
            if engine.at_boundary != (micro == stream.accumulation - 1):
                raise RuntimeError(f"step {step + 1}, micro-batch {micro}: DeepSpeed's "
                                   "accumulation boundary is out of step with the stream")
            engine.backward(losses.loss)
            engine.step()
            micro_losses.append(torch.stack(list(losses)))
        losses = type(losses)(*torch.stack(micro_losses).mean(0))  # this rank's step means
        seen["t2i_tokens_seen"] += plan.t2i_tokens
        seen["i2t_tokens_seen"] += plan.i2t_tokens
        interval_tokens += plan.t2i_tokens + plan.i2t_tokens
        done = step + 1

        if done % t.log_every == 0 or done == t.steps:
            elapsed = time.perf_counter() - interval_start
            row = {"step": done, "loss": losses.loss.item(), "ar_loss": losses.ar_loss.item(),
                   "dm_loss": losses.dm_loss.item(), "repa_loss": losses.repa_loss.item(),
                   "lr": engine.lr, "grad_norm": engine.grad_norm,
                   "tokens_per_s": interval_tokens / max(elapsed, 1e-9), **seen}
            bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}",
                            tok_s=f"{row['tokens_per_s']:.0f}")
            if rank() == 0:
                with open(out / "train_log.jsonl", "a") as fh:
                    fh.write(json.dumps(row) + "\n")
                tracker.log_metrics({k: row[k] for k in LOG_FIELDS if k != "step"}, done)
            interval_tokens, interval_start = 0, time.perf_counter()
        if done % t.checkpoint_every == 0 and done < t.steps:
            checkpoint.save(ckpt_dir, done, model=model, save_engine=engine.save,
                            data_state={"step": done, **seen}, meta=identity,
                            keep_last=t.keep_last)
        if done in t.eval_steps and rank() == 0:
            model.save(out / "steps" / str(done))  # atomic: a model dir the eval rules read

    # Finish: frozen text weights must be untouched, bitwise, in the dtype training holds them.
    text_hash = text_weight_hash(model.llm)
    if not VARIANTS[cfg.model.architecture].trains_text and text_hash != expected_hash:
        raise RuntimeError(f"{cfg.name}: frozen text weights changed during training")
    result = {"run": cfg.name, "recipe": recipe, "steps": t.steps,
              "eval_steps": list(t.eval_steps), "text_weight_hash": text_hash, **seen}
    if rank() == 0:
        atomic_write_json(out / "done.json", result)
    tracker.finish()
    return result


def main(argv: list[str] | None = None) -> None:
    train(parse_args(argv))
    shutdown_distributed()  # the command line's process ends here; in-process callers keep it


if __name__ == "__main__":
    main()
