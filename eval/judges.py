"""Tiny-scale judges: a CLIP dual encoder and a BLIP-2 ITM model, trained offline on tiny-world
image-caption pairs. The DAG fits them on the train split's pairs (as CLIP never saw COCO val)
and measures them on the held-out pairs that the metrics then score.

At paper scale the metrics load pretrained evaluators (Inception for FID, OpenAI CLIP, BLIP-2
ITM). None can be had offline, and none knows the tiny world, so at tiny scale the pipeline
trains stand-ins with the same transformers classes. Every metric then runs the same code at
both scales: only the checkpoint path differs (`judge_clip` / `judge_itm` in the config).

- CLIP judge: `CLIPModel` from a tiny `CLIPConfig` (ViT on `data.image_size` px), symmetric
  InfoNCE (`return_loss=True`). Used for CLIP score, as FID's feature extractor, and as the
  BERTScore encoder of Supp. Fig. E.
- ITM judge: `Blip2ForImageTextRetrieval` from a tiny `Blip2Config`, trained on the ITM head
  with 1 positive : 2 negatives per pair (a wrong caption for the image, a wrong image for the
  caption) jointly with the Q-Former's contrastive loss (ITC), as in BLIP-2, after an ITC-only
  warm-up. Half of the negatives are hard: another image's caption whose primary object shares
  its shape or colour (`labels`), so the head must read attributes, not just scene layout; the
  rest are random, so easy mismatches are learnt too.
- Text: a word-level tokenizer built from the pairs' words (the world's vocabulary is closed),
  saved as a fast tokenizer with each processor, so `from_pretrained` + `AutoProcessor` load a
  judge exactly like a hub checkpoint.

Which pairs train the judges: with `--train-scenes` and `--train-captions` (what the DAG passes:
the train split) the judges train on those pairs and all held-out pairs measure them
(quality.json); without them, on the held-out split minus a seeded fraction
`evaluation.judge_val_fraction` kept to measure them.

References: Radford et al. 2021 (CLIP, contrastive loss); Li et al. 2023 (BLIP-2, ITM with hard
negatives); transformers' `CLIPModel`, `Blip2ForImageTextRetrieval`.

    python -m eval.judges --config C --scenes R/world/heldout/scenes.jsonl \
        --captions R/captions/heldout.jsonl --out R/judges
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from tqdm import tqdm
from transformers import (BlipImageProcessor, Blip2Config, Blip2ForImageTextRetrieval,
                          Blip2Processor, CLIPConfig, CLIPImageProcessor, CLIPModel,
                          CLIPProcessor, PreTrainedTokenizerFast)

from eval.clip_score import clip_features
from eval.common import load_images
from eval.itm import itm_match_probs
from xfusion.config import EvaluationConfig, RunConfig, load_run
from xfusion.data import resolve_image
from xfusion.io import atomic_dir, atomic_write_json, read_jsonl

SPECIALS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")  # ids 0..3, in this order
HARD_NEGATIVE_SHARE = 0.5  # share of ITM negatives that share an attribute with the positive
ITC_TEMPERATURE = 0.07  # BLIP-2's initial (learnable there, fixed here) contrastive temperature
HEAD_DIM = 16  # judges' attention head width: 4 heads at width 64 (1-2 heads learn ITM slowly)
# An ITM step scores each pair 3 times (positive + 2 negatives) through vision and Q-Former,
# plus ITC. Half the CLIP batch: at a quarter, a third of seeds left ITM at its class prior on
# a 128-pair toy world (half the steps ITC-only, 800 steps); at half, none of 6 seeds did.
ITM_BATCH_DIVISOR = 2
ITC_WARMUP_SHARE = 0.5  # ITM judge: share of the steps that train ITC alone (see train_itm)


@dataclass
class Pairs:
    """Aligned image-caption pairs with the primary object's labels (None when unknown)."""

    images: list  # PIL images
    captions: list[str]
    labels: list[dict | None]
    short_captions: list[str | None]


def read_world_pairs(scenes: str | Path, captions: str | Path) -> Pairs:
    """Join scenes.jsonl (labels, short_caption) and captions jsonl (caption) on `id`."""
    caps = {r["id"]: r for r in read_jsonl(captions)}
    rows = read_jsonl(scenes)
    missing = [r["id"] for r in rows if r["id"] not in caps]
    if missing:
        raise SystemExit(f"{captions}: no caption for {len(missing)} images of {scenes} "
                         f"(first: {missing[0]})")
    paths = [resolve_image(r["image"], scenes) for r in rows]
    return Pairs(load_images(paths), [caps[r["id"]]["caption"] for r in rows],
                 [r.get("labels") for r in rows], [r.get("short_caption") for r in rows])


def subset(p: Pairs, idx: list[int]) -> Pairs:
    return Pairs([p.images[i] for i in idx], [p.captions[i] for i in idx],
                 [p.labels[i] for i in idx], [p.short_captions[i] for i in idx])


# --- building the judges ----------------------------------------------------------------------

def build_tokenizer(texts: list[str], max_length: int) -> PreTrainedTokenizerFast:
    """Word-level, lower-cased, `[BOS] text [EOS]`: CLIP pools the text at its EOS token."""
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=list(SPECIALS)))
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", 2), ("[EOS]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   bos_token="[BOS]", eos_token="[EOS]",
                                   model_max_length=max_length)


def _vision(e: EvaluationConfig, image_size: int) -> dict:
    w = e.judge_width
    # initializer_range: Blip2VisionConfig defaults to 1e-10 (its weights always come from a
    # checkpoint); trained from scratch that is a dead tower, so use ViT's usual 0.02.
    return dict(image_size=image_size, patch_size=e.judge_patch_size, hidden_size=w,
                intermediate_size=4 * w, num_hidden_layers=e.judge_layers,
                num_attention_heads=max(1, w // HEAD_DIM), initializer_range=0.02)


def build_clip(cfg: RunConfig, tokenizer) -> tuple[CLIPModel, CLIPProcessor]:
    e, w = cfg.evaluation, cfg.evaluation.judge_width
    text = dict(vocab_size=len(tokenizer), hidden_size=w, intermediate_size=4 * w,
                num_hidden_layers=e.judge_layers, num_attention_heads=max(1, w // HEAD_DIM),
                max_position_embeddings=tokenizer.model_max_length, pad_token_id=0,
                bos_token_id=2, eos_token_id=3)
    config = CLIPConfig(text_config=text, vision_config=_vision(e, cfg.data.image_size),
                        projection_dim=w)
    size = cfg.data.image_size
    images = CLIPImageProcessor(size={"shortest_edge": size},
                                crop_size={"height": size, "width": size})
    return CLIPModel(config), CLIPProcessor(image_processor=images, tokenizer=tokenizer)


def build_itm(cfg: RunConfig, tokenizer) -> tuple[Blip2ForImageTextRetrieval, Blip2Processor]:
    e, w = cfg.evaluation, cfg.evaluation.judge_width
    size = cfg.data.image_size
    # num_query_tokens=0: no <image> placeholders in the text (image_token_index stays None),
    # the layout of the original ITM checkpoints; the processor still registers <image>.
    processor = Blip2Processor(image_processor=BlipImageProcessor(
        size={"height": size, "width": size}), tokenizer=copy.deepcopy(tokenizer),
        num_query_tokens=0)
    qformer = dict(vocab_size=len(processor.tokenizer), hidden_size=w, intermediate_size=4 * w,
                   num_hidden_layers=e.judge_layers, num_attention_heads=max(1, w // HEAD_DIM),
                   encoder_hidden_size=w, cross_attention_frequency=1,
                   max_position_embeddings=tokenizer.model_max_length, pad_token_id=0,
                   use_qformer_text_input=True,  # the ITM head reads text through the Q-Former
                   # No dropout: with it (BERT's 0.1) this tiny Q-Former does not learn at all
                   # (ITC and ITM stay at chance); the judges see little data, not noisy data.
                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config = Blip2Config(vision_config=_vision(e, size), qformer_config=qformer,
                         num_query_tokens=e.judge_query_tokens, image_text_hidden_size=w)
    model = Blip2ForImageTextRetrieval(config)
    # transformers zero-initialises the queries (checkpoints overwrite them); trained from
    # scratch, identical queries would stay identical, so draw them as LAVIS does.
    torch.nn.init.normal_(model.query_tokens, std=config.qformer_config.initializer_range)
    return model, processor


# --- training -----------------------------------------------------------------------------------

def _optimiser(model: torch.nn.Module, e: EvaluationConfig):
    """AdamW, 5% linear warm-up, then constant: the ITM head only starts learning late in
    training (after the ITC warm-up), where a decaying schedule would have starved it."""
    opt = torch.optim.AdamW(model.parameters(), lr=e.judge_lr, weight_decay=0.01)
    warm = max(1, e.judge_steps // 20)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warm))


def _batches(n: int, size: int, steps: int, gen: torch.Generator):
    """`steps` index batches drawn epoch by epoch without replacement (no pair twice per batch)."""
    size = min(size, n)
    perm, pos = torch.randperm(n, generator=gen), 0
    for _ in range(steps):
        if pos + size > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        yield perm[pos:pos + size]
        pos += size


class NegativeSampler:
    """Draws, for each pair, another pair with a different caption: with probability
    `hard_share` one whose primary object shares shape or colour (a hard negative), else any.
    Candidate sets are (N, N) masks built once, so drawing a batch is one multinomial."""

    def __init__(self, captions: list[str], labels: list[dict | None]):
        groups = {c: k for k, c in enumerate(dict.fromkeys(captions))}
        cap = torch.tensor([groups[c] for c in captions])
        different = cap[:, None] != cap[None, :]  # (N, N)
        if not different.any(1).all():  # a caption shared by every pair: any other pair
            different = ~torch.eye(len(captions), dtype=torch.bool)

        def codes(key: str) -> torch.Tensor:  # -1 = unknown, never equal to a known one
            values = {v: k for k, v in enumerate(sorted({l[key] for l in labels if l}))}
            return torch.tensor([values[l[key]] if l else -1 for l in labels])
        shape, colour = codes("shape"), codes("colour")
        shares = (((shape[:, None] == shape[None, :]) & (shape[:, None] >= 0))
                  | ((colour[:, None] == colour[None, :]) & (colour[:, None] >= 0)))
        hard = shares & different
        self.any = different.float()
        self.hard = torch.where(hard.any(1, keepdim=True), hard, different).float()

    def __call__(self, idx: torch.Tensor, gen: torch.Generator,
                 hard_share: float = HARD_NEGATIVE_SHARE) -> torch.Tensor:
        use_hard = torch.rand(len(idx), generator=gen) < hard_share
        weights = torch.where(use_hard[:, None], self.hard[idx], self.any[idx])
        return torch.multinomial(weights, 1, generator=gen).squeeze(1)


def _encode(processor, pairs: Pairs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pixels (N, 3, S, S), ids and mask (N, L) once, through the judge's own processor."""
    px = processor.image_processor(pairs.images, return_tensors="pt")["pixel_values"]
    tok = processor.tokenizer(pairs.captions, return_tensors="pt", padding=True, truncation=True)
    return px, tok["input_ids"], tok["attention_mask"]


def _trim(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop padding columns no row of the batch uses."""
    length = int(mask.sum(1).max())
    return ids[:, :length], mask[:, :length]


def _optimizer_step(loss: torch.Tensor, opt, sched, losses: list[float], bar) -> None:
    """One update of a judge, its loss logged to the list and the progress bar."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    # Clipped like the X-Fusion recipe (1.0): from scratch at lr 1e-3 a tiny Q-Former otherwise
    # takes spikes that can park the ITM head at its class prior.
    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
    opt.step()
    sched.step()
    losses.append(loss.item())
    bar.set_postfix(loss=f"{loss.item():.3f}")


def train_clip(model: CLIPModel, processor, pairs: Pairs, e: EvaluationConfig,
               gen: torch.Generator) -> list[float]:
    px, ids, mask = _encode(processor, pairs)
    opt, sched = _optimiser(model, e)
    model.train()
    losses = []
    bar = tqdm(_batches(len(px), e.judge_batch_size, e.judge_steps, gen), total=e.judge_steps,
               desc="CLIP judge")
    for b in bar:
        i, m = _trim(ids[b], mask[b])
        loss = model(input_ids=i, attention_mask=m, pixel_values=px[b], return_loss=True).loss
        _optimizer_step(loss, opt, sched, losses, bar)
    return losses


def itc_loss(model: Blip2ForImageTextRetrieval, px, ids, mask) -> torch.Tensor:
    """Symmetric InfoNCE over the Q-Former's image-text similarities (BLIP-2's ITC)."""
    i, m = _trim(ids, mask)
    sim = model(input_ids=i, attention_mask=m, pixel_values=px,
                use_image_text_matching_head=False).logits_per_image  # (B, B) cosines
    labels = torch.arange(len(px))
    return 0.5 * (F.cross_entropy(sim / ITC_TEMPERATURE, labels)
                  + F.cross_entropy(sim.T / ITC_TEMPERATURE, labels))


def train_itm(model: Blip2ForImageTextRetrieval, processor, pairs: Pairs, e: EvaluationConfig,
              gen: torch.Generator) -> list[float]:
    """ITC warm-up, then ITM (1 positive : 2 negatives) + ITC.

    BLIP-2 trains ITM jointly with image-text contrastive learning (ITC) from a pretrained
    BERT. From scratch, ITM alone stalls at its 1:2 class prior: nothing yet pulls the
    caption-relevant content out of the image. ITC does, and costs a third of an ITM step, so
    the first ITC_WARMUP_SHARE of the steps train ITC alone."""
    px, ids, mask = _encode(processor, pairs)
    opt, sched = _optimiser(model, e)
    model.train()
    losses = []
    bar = tqdm(_batches(len(px), max(2, e.judge_batch_size // ITM_BATCH_DIVISOR), e.judge_steps,
                        gen), total=e.judge_steps, desc="ITM judge")
    sample_negatives = NegativeSampler(pairs.captions, pairs.labels)
    for step, b in enumerate(bar):
        loss = itc_loss(model, px[b], ids[b], mask[b])
        if step >= ITC_WARMUP_SHARE * e.judge_steps:
            neg_text = sample_negatives(b, gen)  # a wrong caption for the image
            neg_image = sample_negatives(b, gen)  # a wrong image for the caption
            images = torch.cat([b, b, neg_image])
            texts = torch.cat([b, neg_text, b])
            target = torch.cat([torch.ones(len(b)), torch.zeros(2 * len(b))]).long()
            i, m = _trim(ids[texts], mask[texts])
            logits = model(input_ids=i, attention_mask=m, pixel_values=px[images],
                           use_image_text_matching_head=True).logits_per_image  # (3B, 2)
            loss = loss + F.cross_entropy(logits, target)
        _optimizer_step(loss, opt, sched, losses, bar)
    return losses


# --- quality ------------------------------------------------------------------------------------

def derangement(n: int, gen: torch.Generator) -> torch.Tensor:
    """A permutation with no fixed point: each image paired with another image's caption."""
    perm = torch.randperm(n, generator=gen)
    out = torch.empty(n, dtype=torch.long)
    out[perm] = perm.roll(1)
    return out


@torch.no_grad()
def clip_retrieval(model: CLIPModel, processor, pairs: Pairs, group: int) -> dict:
    """Top-1 retrieval within consecutive groups of `group` pairs (chance = 1/group); a
    retrieved caption that is word-for-word the true one counts as correct."""
    model.eval()
    img = clip_features(model, processor, images=pairs.images)
    txt = clip_features(model, processor, texts=pairs.captions)
    hits = {"image_to_text": 0, "text_to_image": 0}
    for s in range(0, len(img), group):
        sim = img[s:s + group] @ txt[s:s + group].T  # (g, g)
        caps = pairs.captions[s:s + group]
        i2t, t2i = sim.argmax(1).tolist(), sim.argmax(0).tolist()
        hits["image_to_text"] += sum(caps[j] == caps[k] for k, j in enumerate(i2t))
        hits["text_to_image"] += sum(caps[j] == caps[k] for k, j in enumerate(t2i))
    return {k: v / len(img) for k, v in hits.items()} | {"group": min(group, len(img)),
                                                          "chance": 1 / min(group, len(img))}


@torch.no_grad()
def itm_quality(model: Blip2ForImageTextRetrieval, processor, pairs: Pairs,
                gen: torch.Generator) -> dict:
    """Accuracy of P(match) > 0.5 on matched pairs, shuffled pairs and hard negatives."""
    model.eval()
    n = len(pairs.captions)
    shuffled = derangement(n, gen)
    hard = NegativeSampler(pairs.captions, pairs.labels)(torch.arange(n), gen, hard_share=1.0)
    probs = {
        "matched": itm_match_probs(model, processor, pairs.images, pairs.captions),
        "shuffled": itm_match_probs(model, processor, pairs.images,
                                    [pairs.captions[j] for j in shuffled]),
        "hard_negative": itm_match_probs(model, processor, pairs.images,
                                         [pairs.captions[j] for j in hard]),
    }
    acc = {"matched": (probs["matched"] > 0.5).float().mean().item(),
           "shuffled": (probs["shuffled"] <= 0.5).float().mean().item(),
           "hard_negative": (probs["hard_negative"] <= 0.5).float().mean().item()}
    return {"accuracy": 0.5 * (acc["matched"] + acc["shuffled"]),  # matched vs shuffled, balanced
            "accuracy_per_set": acc,
            "mean_score": {k: 100 * v.mean().item() for k, v in probs.items()}}


# --- entry point --------------------------------------------------------------------------------

def train_judges(cfg: RunConfig, fit: Pairs, val: Pairs, out: Path) -> dict:
    """Train both judges on `fit`, measure them on `val`, save them under `out`."""
    e = cfg.evaluation
    texts = fit.captions + val.captions + [s for s in fit.short_captions + val.short_captions if s]
    # The vocabulary (not the weights) sees the validation words too: the tiny world's
    # vocabulary is closed, and an [UNK] for a colour would measure the tokenizer, not the judge.
    tokenizer = build_tokenizer(texts, max_length=2 * cfg.data.max_caption_tokens)
    quality: dict = {"n_fit": len(fit.captions), "n_val": len(val.captions),
                     "steps": e.judge_steps, "vocab_size": len(tokenizer)}
    for name, build, train in (("clip", build_clip, train_clip), ("itm", build_itm, train_itm)):
        torch.manual_seed(cfg.seed)
        gen = torch.Generator().manual_seed(cfg.seed)
        model, processor = build(cfg, tokenizer)
        start = time.perf_counter()
        losses = train(model, processor, fit, e, gen)
        seconds = time.perf_counter() - start
        if name == "clip":
            q = clip_retrieval(model, processor, val, e.judge_batch_size)
        else:
            q = itm_quality(model, processor, val, gen)
        quality[name] = q | {"train_seconds": round(seconds, 1),
                             "final_loss": sum(losses[-20:]) / max(1, len(losses[-20:]))}
        model.save_pretrained(out / name)
        processor.save_pretrained(out / name)
    return quality


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--scenes", required=True, help="R/world/heldout/scenes.jsonl")
    p.add_argument("--captions", required=True, help="R/captions/heldout.jsonl")
    p.add_argument("--train-scenes", help="train the judges on these pairs instead (optional)")
    p.add_argument("--train-captions")
    p.add_argument("--out", required=True, type=Path, help="R/judges")
    args = p.parse_args(argv)
    cfg = load_run(args.config)
    e = cfg.evaluation
    if e.judge_steps <= 0:
        raise SystemExit(f"config.evaluation.judge_steps = {e.judge_steps}: the judges are a "
                         "tiny-scale stand-in; this scale names pretrained evaluators instead")
    if bool(args.train_scenes) != bool(args.train_captions):
        raise SystemExit("--train-scenes and --train-captions go together")
    heldout = read_world_pairs(args.scenes, args.captions)
    if args.train_scenes:
        fit, val = read_world_pairs(args.train_scenes, args.train_captions), heldout
        source = str(args.train_scenes)
    else:
        n = len(heldout.captions)
        n_val = max(1, round(e.judge_val_fraction * n))
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed)).tolist()
        fit, val = subset(heldout, sorted(perm[n_val:])), subset(heldout, sorted(perm[:n_val]))
        source = f"{args.scenes} minus {n_val} validation pairs"
    with atomic_dir(args.out) as tmp:
        quality = train_judges(cfg, fit, val, tmp) | {"trained_on": source}
        atomic_write_json(tmp / "quality.json", quality)
    print(f"judges -> {args.out}: CLIP image->text top-1 "
          f"{quality['clip']['image_to_text']:.3f} (chance {quality['clip']['chance']:.3f}); "
          f"ITM accuracy {quality['itm']['accuracy']:.3f}")
    return quality


if __name__ == "__main__":
    main()
