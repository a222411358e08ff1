"""Sampling from a trained X-Fusion model: text-to-image and image-to-text.

T2I: flow-matching Euler steps with diffusers' FlowMatchEulerDiscreteScheduler (sigma = t), and
classifier-free guidance with the conditional and the unconditional (dropped-caption) branch in
one batch. The prompt's keys/values are computed once per layer and tower (towers.KVCache) and
reused at every step, where only the image tokens run: the prompt never attends to the image.
I2T: the clean image (t = 0) is encoded once, then the caption is decoded token by token from a
KV cache, greedy or nucleus (`evaluation.top_p`).

    python -m xfusion.sample --model R/runs/RUN/steps/STEP --mode t2i \
        --prompts R/captions/heldout.jsonl --out R/samples/RUN/STEP/t2i
    python -m xfusion.sample --model R/runs/RUN/steps/STEP --mode i2t \
        --latents R/latents/heldout.safetensors --captions R/captions/heldout.jsonl \
        --out R/samples/RUN/STEP/i2t.jsonl

References: X-Fusion Sec. 4-5 (CFG scale 5.5, 50 steps at paper scale); Ho & Salimans 2022
(classifier-free guidance); Holtzman et al. 2020 (nucleus sampling); DiT sample.py (layout);
diffusers FlowMatchEulerDiscreteScheduler (set_timesteps, step).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from PIL import Image
from tqdm import tqdm

from xfusion.config import EvaluationConfig, load_run
from xfusion.data import BadInputs, captioned_records, records_by_id, report_path, save_png
from xfusion.io import atomic_path, atomic_write_jsonl, read_jsonl
from xfusion.model.sequence import encode_captions, i2i_prefix, prompt_tokens
from xfusion.model.towers import KVCache
from xfusion.model.xfusion import XFusionModel
from xfusion.tracking import RUN_ID_FILE, log_image


def latent_shape(model: XFusionModel) -> tuple[int, int, int]:
    c = model.cfg.model.codec
    side = model.cfg.data.image_size // c.downsample
    return c.latent_channels, side, side


def left_pad(rows: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ids -> (B, L) ids and validity, padded on the left so every row's next token sits
    in the same column (RoPE positions skip the padding: mask.position_ids)."""
    L = max(map(len, rows))
    ids = torch.full((len(rows), L), pad, dtype=torch.long)
    valid = torch.zeros(len(rows), L, dtype=torch.bool)
    for b, row in enumerate(rows):
        ids[b, L - len(row):] = torch.tensor(row)
        valid[b, L - len(row):] = True
    return ids.to(device), valid.to(device)


def image_slots(rows: list[list[int]], offset: int, P: int, L: int, device) -> torch.Tensor:
    """(B, L) bool: the P slots starting `offset` tokens into each left-padded row of length L."""
    mask = torch.zeros(len(rows), L, dtype=torch.bool)
    for b, row in enumerate(rows):
        start = L - len(row) + offset
        mask[b, start:start + P] = True
    return mask.to(device)


@torch.no_grad()
def generate_images(model: XFusionModel, prompt_ids: list[list[int]], steps: int, cfg_scale: float,
                    generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
                    shift: float | None = None, kv_cache: bool = True,
                    sources: torch.Tensor | None = None) -> torch.Tensor:
    """Latents (B, C, h, w) for B prompts. Initial noise: `noise`, else drawn (on the CPU) from
    `generator`; `shift`: the scheduler's (default `evaluation.sample_shift`). `kv_cache=False`
    recomputes the prompt at every step (the reference the cache is tested against).
    `sources` (B, C, h, w): image-conditioned generation (the I2I layout of
    xfusion.model.sequence: editing, painting): each prompt is the instruction for its clean
    source image, which sits in the cached prefix; the unconditional branch drops the
    instruction and keeps the source."""
    device, ids = model.device, model.ids
    C, h, w = latent_shape(model)
    P = (h // model.cfg.model.patch_size) * (w // model.cfg.model.patch_size)
    guided = cfg_scale != 1.0
    branches = (False, True) if guided else (False,)  # conditional, then the dropped prompt
    if sources is None:  # [bos] caption [BOI]
        rows = [prompt_tokens("t2i", p, ids, drop_caption=d)[0] for d in branches
                for p in prompt_ids]
    else:  # [bos] [BOI] SRC*P [EOI] instruction [BOI]
        built = [i2i_prefix(p, ids, P, drop_instruction=d) for d in branches for p in prompt_ids]
        rows, offset = [row for row, _ in built], built[0][1]
    prefix, prefix_valid = left_pad(rows, ids.pad, device)
    source = (image_slots(rows, offset, P, prefix.shape[1], device) if sources is not None
              else torch.zeros_like(prefix, dtype=torch.bool))
    prefix_embeds = model.embed(prefix, image_mask=source)  # BOI/EOI take their learned embeddings
    if sources is not None:
        src = sources.to(device=device, dtype=torch.float32)
        prefix_embeds = model.embed_sources(prefix_embeds, source, torch.cat([src] * len(branches)))
    n = prefix.shape[0]
    image = torch.ones(n, P, dtype=torch.bool, device=device)  # image mask = validity
    span = image.long() * (2 if sources is not None else 1)  # the source, if any, is span 1
    cache = None
    if kv_cache:  # the prompt's keys/values, once
        cache = KVCache()
        model.forward_chunk(prefix_embeds, source, source.long(), prefix_valid, cache)
        cache.frozen = True
    x = noise if noise is not None else torch.randn((len(prompt_ids), C, h, w), generator=generator)
    x = x.to(device=device, dtype=torch.float32)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=model.cfg.evaluation.sample_shift if shift is None else shift)
    scheduler.set_timesteps(steps, device=device)
    for i, timestep in enumerate(scheduler.timesteps):
        t = scheduler.sigmas[i].expand(n)  # sigma = our t
        tokens = model.image_io.encode(torch.cat([x, x]) if guided else x, t)  # (n, P, D)
        if cache is not None:
            h_image, _ = model.forward_chunk(tokens, image, span, image, cache, t=t)
        else:
            hidden, _ = model.forward_chunk(torch.cat([prefix_embeds, tokens], 1),
                                            torch.cat([source, image], 1),
                                            torch.cat([source.long(), span], 1),
                                            torch.cat([prefix_valid, image], 1), t=t)
            h_image = hidden[:, -P:]
        v = model.velocity(h_image, (h, w), torch.cat([x, x]) if guided else x,
                           t).float()  # (n, C, h, w)
        if guided:
            v_cond, v_uncond = v.chunk(2)
            v = v_uncond + cfg_scale * (v_cond - v_uncond)
        x = scheduler.step(v, timestep, x).prev_sample
    return x


def choose_token(logits: torch.Tensor, top_p: float | None, generator=None) -> torch.Tensor:
    """(B, V) -> (B,): argmax, or a draw from the smallest set of tokens with mass >= top_p."""
    if top_p is None:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float(), -1).cpu()
    sorted_p, order = probs.sort(-1, descending=True)
    keep = (sorted_p.cumsum(-1) - sorted_p) < top_p  # the top token is always kept
    sorted_p = sorted_p * keep
    pick = torch.multinomial(sorted_p / sorted_p.sum(-1, keepdim=True), 1, generator=generator)
    return order.gather(-1, pick).squeeze(-1).to(logits.device)


@torch.no_grad()
def generate_captions(model: XFusionModel, latents: torch.Tensor, max_new_tokens: int,
                      top_p: float | None = None, generator: torch.Generator | None = None,
                      kv_cache: bool = True,
                      questions: list[list[int]] | None = None) -> list[list[int]]:
    """Caption token ids (eos excluded) of B clean latents (B, C, h, w); with `questions` (one
    token list per image: the VQA layout of xfusion.model.sequence), the answers to them."""
    device, ids = model.device, model.ids
    latents = latents.to(device=device, dtype=torch.float32)
    B = latents.shape[0]
    P = model.image_io.encode(latents[:1], torch.zeros(1, device=device)).shape[1]
    rows = []  # [bos] [BOI] IMG*P [EOI] (question), left-padded to one length
    for question in questions or [[]] * B:
        before, after = prompt_tokens("vqa", [], ids, prompt=question)
        rows.append(before + [ids.pad] * P + after)
    seq_ids, valid = left_pad(rows, ids.pad, device)
    image = image_slots(rows, len(before), P, seq_ids.shape[1], device)
    t = torch.zeros(B, device=device)  # clean
    tokens = model.image_io.encode(latents, t)
    embeds = model.embed(seq_ids, image, tokens)
    cache = KVCache() if kv_cache else None
    hidden, _ = model.forward_chunk(embeds, image, image.long(), valid, cache, t=t)
    out: list[list[int]] = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool)
    one_text = torch.zeros(B, 1, dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        nxt = choose_token(model.text_head(hidden[:, -1]), top_p, generator)  # (B,)
        for b, token in enumerate(nxt.tolist()):
            if not done[b]:
                done[b] = token == ids.eos
                if not done[b]:
                    out[b].append(token)
        if done.all():
            break
        new = model.embed(nxt[:, None])  # (B, 1, D)
        if cache is not None:
            hidden, _ = model.forward_chunk(new, one_text, one_text.long(), ~one_text, cache)
        else:  # the reference: the whole sequence again
            embeds, image = torch.cat([embeds, new], 1), torch.cat([image, one_text], 1)
            valid = torch.cat([valid, ~one_text], 1)
            hidden, _ = model.forward_chunk(embeds, image, image.long(), valid, t=t)
    return out


# -- files ---------------------------------------------------------------------------------------
def to_image(pixels: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] -> an RGB image."""
    array = ((pixels.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def save_pixels(pixels: torch.Tensor, path: Path) -> None:
    """(3, H, W) in [-1, 1] -> an RGB PNG, written atomically without metadata."""
    save_png(to_image(pixels), path)


def sample_grid(paths: list[Path], columns: int = 4, cell: int = 96) -> Image.Image:
    """The first `columns`² images side by side, each scaled to `cell` px (nearest: a tiny
    sample stays pixel-exact), row-major in the given order: what a person looks at first."""
    paths = paths[:columns * columns]
    rows = -(-len(paths) // columns)
    grid = Image.new("RGB", (columns * cell, rows * cell), (255, 255, 255))
    for i, path in enumerate(paths):
        with Image.open(path) as img:
            tile = img.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST)
        grid.paste(tile, ((i % columns) * cell, (i // columns) * cell))
    return grid


def log_grid(out_dir: Path, model_dir: Path, entries: list[dict]) -> None:
    """`<out_dir>_grid.png` beside the samples (not inside: FID reads every PNG there) and the
    same grid in the trained run's MLflow run as `samples/step_<STEP>_t2i.png`, when the model
    dir is a step dir of a run (R/runs/RUN/steps/STEP)."""
    grid = sample_grid([out_dir / e["file"] for e in entries])
    with atomic_path(out_dir.with_name(out_dir.name + "_grid.png")) as tmp:
        grid.save(tmp, format="PNG")
    run_dir = model_dir.parent.parent
    if model_dir.parent.name == "steps" and (run_dir / RUN_ID_FILE).is_file():
        log_image(run_dir, grid, f"samples/step_{model_dir.name}_t2i.png")


def sample_t2i(model: XFusionModel, ev: EvaluationConfig, prompts: Path, out_dir: Path,
               seed: int, policy: str = "stop") -> None:
    """`<index>.png` + index.jsonl for the first `n_samples` prompts; existing PNGs are kept.
    Sample i starts from noise seeded by (seed, i), so a resumed run gives the same images.
    Prompt lines that are bad inputs follow `policy` (`data.bad_input_policy`; the skip report
    is `<out_dir>.bad_inputs.json` beside it)."""
    from xfusion.codec import build_codec

    bad = BadInputs(policy)  # the prompts are user data: R/captions/heldout.jsonl
    records = captioned_records(prompts, bad, keys=("id",))[:ev.n_samples]
    entries = [{"index": i, "id": r["id"], "prompt": r["caption"], "file": f"{i}.png"}
               for i, (_, r) in enumerate(records)]
    todo = [e for e in entries if not (out_dir / e["file"]).exists()]
    codec = build_codec(model.cfg.model.codec).to(model.device)
    shape = latent_shape(model)
    for start in tqdm(range(0, len(todo), ev.sample_batch_size), desc="t2i", unit="batch"):
        batch = todo[start:start + ev.sample_batch_size]
        prompt_ids = encode_captions(model.tokenizer, [e["prompt"] for e in batch],
                                     model.cfg.data.max_caption_tokens)
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(
            seed * 1_000_003 + e["index"])) for e in batch])
        latents = generate_images(model, prompt_ids, ev.sample_steps, ev.cfg_scale, noise=noise,
                                  shift=ev.sample_shift)
        with torch.no_grad():
            pixels = codec.decode(latents)
        for e, px in zip(batch, pixels):
            save_pixels(px, out_dir / e["file"])
    atomic_write_jsonl(out_dir / "index.jsonl", entries)
    bad.finish(report_path(out_dir))  # beside, like the grid: FID reads every file inside


def sample_i2t(model: XFusionModel, ev: EvaluationConfig, latents_path: Path, captions: Path,
               out: Path, seed: int) -> None:
    """One JSON line {"id", "image", "reference", "caption"} per image (first `n_samples`)."""
    from xfusion.latents import load_latents

    latents, ids = load_latents(latents_path)
    refs = records_by_id(captions)
    n = min(ev.n_samples, len(ids))
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for start in tqdm(range(0, n, ev.sample_batch_size), desc="i2t", unit="batch"):
        stop = min(start + ev.sample_batch_size, n)
        captions_ids = generate_captions(model, latents[start:stop], ev.caption_max_tokens,
                                         ev.top_p, generator)
        for i, caption in zip(range(start, stop), captions_ids):
            ref = refs.get(ids[i], {})
            rows.append({"id": ids[i], "image": ref.get("image"), "reference": ref.get("caption"),
                         "caption": model.tokenizer.decode(caption, skip_special_tokens=True)})
    atomic_write_jsonl(out, rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Sample images (t2i) or captions (i2t).")
    p.add_argument("--model", required=True, help="a model dir (R/runs/RUN/steps/STEP)")
    p.add_argument("--mode", required=True, choices=("t2i", "i2t"))
    p.add_argument("--prompts", type=Path, help="t2i: captions JSONL ({id, image, caption})")
    p.add_argument("--latents", type=Path, help="i2t: latents safetensors")
    p.add_argument("--captions", type=Path, help="i2t: reference captions JSONL")
    p.add_argument("--out", required=True, type=Path, help="t2i: a directory; i2t: a JSONL file")
    p.add_argument("--config", help="a config whose `evaluation` and `seed` override the model's")
    p.add_argument("--run", help="the run of --config to take `evaluation` and `seed` from")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    # Setup: the model on its base LLM (base_model.json), sampling settings.
    model = XFusionModel.load(args.model).eval().to(args.device)
    # The sampling settings of the config the rule passes: they are what its recipe hash covers
    # (xfusion.config.READS), and they change without retraining the model.
    settings = load_run(args.config, args.run) if args.config else model.cfg
    ev, seed = settings.evaluation, settings.seed
    if args.mode == "t2i":
        if args.prompts is None:
            p.error("--mode t2i needs --prompts")
        sample_t2i(model, ev, args.prompts, args.out, seed, settings.data.bad_input_policy)
        log_grid(args.out, Path(args.model), read_jsonl(args.out / "index.jsonl"))
    else:
        if args.latents is None or args.captions is None:
            p.error("--mode i2t needs --latents and --captions")
        sample_i2t(model, ev, args.latents, args.captions, args.out, seed)


if __name__ == "__main__":
    main()
