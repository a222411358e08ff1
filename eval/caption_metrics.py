"""Caption metrics for a long detailed caption vs a short poor one (X-Fusion Supp. C.2, Fig. E).

For each evaluation image, two candidate captions are scored: the long detailed caption of
R/captions (the paper's InternVL caption, "Sample 1") and the record's `short_caption` (the
paper's "This image is a photo of kitchen.", "Sample 2"), with three metrics:
- BERTScore F1 against the reference captions, the best over them (bert_score's rule for several
  references): greedy matching of contextual token embeddings by
  cosine similarity, F1 of precision (candidate tokens) and recall (reference tokens), no idf
  weighting and no baseline rescaling (bert_score's defaults). Paper scale: `roberta-large`
  layer 17, bert_score's English default. Tiny scale: the CLIP judge's text encoder (its hidden
  states at `evaluation.bertscore_layer`, special tokens excluded) - a causal encoder, so each
  token's context is its left context only; a stand-in, not a BERT.
- CLIP score (eval.clip_score) of the image and the candidate.
- BLIP-2 ITM score (eval.itm) of the image and the candidate.
Tiny scale (the held-out split): the reference plays COCO's human caption, a short but complete
caption listing every object ("a large blue cross and a small red circle."), composed from the
scene record. Paper scale (the COCO split, xfusion.data.coco): the short caption is the image's
sampled human COCO caption and the references are its other human captions (`references`).

The paper's point: BERTScore and CLIP score rate both captions alike; BLIP separates them.
`value` = BLIP(long) - BLIP(short); `details.rows` = {caption kind: {bertscore, clip, blip}}.

References: Zhang et al., "BERTScore: Evaluating Text Generation with BERT", ICLR 2020;
Hessel et al. 2021 (CLIPScore); Li et al. 2023 (BLIP-2).

    python -m eval.caption_metrics --config C --scenes R/world/<heldout|coco>/scenes.jsonl \
        --captions R/captions/<heldout|coco>.jsonl [--judges R/judges] \
        --out R/metrics/caption_metrics.json
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer, CLIPModel

from eval.clip_score import clip_scores, load_clip
from eval.common import (JUDGES, batches, device, load_config, load_images, metric_parser,
                         resolve_evaluator, write_metric)
from eval.itm import itm_match_probs, load_itm
from xfusion.data import resolve_image
from xfusion.io import read_jsonl

ROWS = {"long_detailed_caption": "caption", "short_poor_caption": "short_caption"}

# texts -> one (n_tokens_i, D) embedding matrix per text, special tokens removed
TokenEmbedder = Callable[[Sequence[str]], list[torch.Tensor]]


def bertscore_f1(candidates: Sequence[str], references: Sequence[str | Sequence[str]],
                 embed: TokenEmbedder) -> torch.Tensor:
    """Per-candidate BERTScore F1 (Zhang et al. 2020, Eq. 1-3 without idf): (N,). A candidate's
    reference may be a list of references: its F1 is then the best over them."""
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    cand, flat = embed(candidates), embed([r for rs in refs for r in rs])
    out, k = [], 0
    for c, rs in zip(cand, refs):
        f1 = []
        for r in flat[k:k + len(rs)]:
            sim = F.normalize(c, dim=-1) @ F.normalize(r, dim=-1).T  # (n_cand, n_ref)
            precision, recall = sim.max(1).values.mean(), sim.max(0).values.mean()
            f1.append(2 * precision * recall / (precision + recall))
        out.append(torch.stack(f1).max())
        k += len(rs)
    return torch.stack(out)


def hidden_state_embedder(model: torch.nn.Module, tokenizer, layer: int,
                          batch_size: int = 32) -> TokenEmbedder:
    """Token embeddings = hidden_states[layer] of a transformers text encoder."""
    dev = next(model.parameters()).device

    @torch.no_grad()
    def embed(texts: Sequence[str]) -> list[torch.Tensor]:
        out = []
        for sl in batches(len(texts), batch_size):
            tok = tokenizer(list(texts[sl]), return_tensors="pt", padding=True, truncation=True,
                            return_special_tokens_mask=True)
            special = tok.pop("special_tokens_mask").bool()
            hidden = model(**{k: v.to(dev) for k, v in tok.items()},
                           output_hidden_states=True).hidden_states[layer].float().cpu()
            keep = tok["attention_mask"].bool() & ~special
            out += [h[k] for h, k in zip(hidden, keep)]
        return out
    return embed


def load_embedder(name: str, judges: str | None, layer: int) -> TokenEmbedder:
    path = resolve_evaluator(name, judges)
    if name in JUDGES:  # the CLIP judge: its text tower
        clip = CLIPModel.from_pretrained(path).eval().to(device())
        return hidden_state_embedder(clip.text_model, AutoTokenizer.from_pretrained(path), layer)
    return hidden_state_embedder(AutoModel.from_pretrained(path).eval().to(device()),
                                 AutoTokenizer.from_pretrained(path), layer)


def reference_caption(scene: dict) -> str:
    """A COCO-like reference: every object's size, colour and shape, nothing else."""
    names = [f"{'an' if o['size'][0] in 'aeiou' else 'a'} {o['size']} {o['colour']} {o['shape']}"
             for o in scene["objects"]]
    return (names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]) + "."


def main(argv: list[str] | None = None) -> dict:
    p = metric_parser(__doc__.split("\n")[0])
    p.add_argument("--scenes", required=True, help="R/world/<heldout|coco>/scenes.jsonl")
    p.add_argument("--captions", required=True, help="R/captions/<heldout|coco>.jsonl")
    args = p.parse_args(argv)
    cfg = load_config(args)
    e = cfg.evaluation
    caps = {r["id"]: r["caption"] for r in read_jsonl(args.captions)}
    rows = [r | {"caption": caps[r["id"]]} for r in read_jsonl(args.scenes)
            if r["id"] in caps][: e.n_samples]
    if not rows or any(not r.get("short_caption") or not (r.get("references") or r.get("scene"))
                       for r in rows):
        raise SystemExit(f"{args.scenes}: Fig. E needs records with a `short_caption` and "
                         "`references` (COCO) or a `scene` (tiny world), matched by id in "
                         f"{args.captions}")
    images = load_images([resolve_image(r["image"], args.scenes) for r in rows])
    references = [r.get("references") or [reference_caption(r["scene"])] for r in rows]
    embed = load_embedder(e.bertscore_model, args.judges, e.bertscore_layer)
    clip, clip_proc = load_clip(resolve_evaluator(e.clip_model, args.judges))
    itm, itm_proc = load_itm(resolve_evaluator(e.itm_model, args.judges))
    table, example = {}, {"id": rows[0]["id"], "references": references[0]}
    for kind, key in ROWS.items():
        texts = [r[key] for r in rows]
        scores = {"bertscore": bertscore_f1(texts, references, embed),
                  "clip": clip_scores(clip, clip_proc, images, texts, args.batch_size),
                  "blip": 100 * itm_match_probs(itm, itm_proc, images, texts, args.batch_size)}
        table[kind] = {m: v.mean().item() for m, v in scores.items()}
        example[kind] = {"text": texts[0]} | {m: v[0].item() for m, v in scores.items()}
    gap = table["long_detailed_caption"]["blip"] - table["short_poor_caption"]["blip"]
    return write_metric(args.out, "caption_metrics", gap, cfg=cfg, job="caption_metrics",
                        run=args.run, step=args.step,
                        n=len(rows), details={"rows": table, "example": example,
                                              "bertscore_model": e.bertscore_model,
                                              "bertscore_layer": e.bertscore_layer,
                                              "clip_model": e.clip_model,
                                              "itm_model": e.itm_model})


if __name__ == "__main__":
    main()
