"""Linear probe of the vision tower's features per layer (X-Fusion Supp. C.3, Fig. D).

References:
- X-Fusion Supp. C.3: features from the vision tower of the trained model, a linear head after a
  parameter-free normalisation, Adam without weight decay, lr 6.4e-3; two ways to read them:
  understanding mode (clean image, t = 0, I2T layout) and generation mode (a text prompt, then
  the image noised at t = 20/1000, T2I layout).
- He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022, and REPA (Yu et al.
  2024) whose probes X-Fusion follows: `BatchNorm1d(affine=False)` before the linear head,
  features mean-pooled over tokens.

Features: `XFusionModel.image_hidden_states(batch, layers)` (the image tokens after each decoder
layer, 1-based), mean-pooled over the image tokens. The probe trains on train-split features
and reports top-1 on held-out ones. Tiny scale: classes are the primary object's `labels`
(shape, colour) of scenes.jsonl; `value` = the best understanding-mode shape accuracy over
layers, `details.per_layer` = {mode: {layer: shape accuracy}}, `details.per_task` the same for
every label.

    python -m eval.linear_probe --config C --run RUN --step STEP --model R/runs/RUN/steps/STEP \
        --train-scenes R/world/train/scenes.jsonl --train-latents R/latents/train.safetensors \
        --train-captions R/captions/train.jsonl --scenes R/world/heldout/scenes.jsonl \
        --latents R/latents/heldout.safetensors --captions R/captions/heldout.jsonl --out F
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from eval.common import load_config, load_xfusion, metric_parser, write_metric
from xfusion.data import records_by_id
from xfusion.latents import load_latents
from xfusion.model.sequence import encode_captions

MODES = ("understanding", "generation")
PRIMARY_TASK = "shape"  # `value` and `per_layer` report this label; the others in per_task


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                 test_y: torch.Tensor, *, lr: float, epochs: int, batch_size: int,
                 seed: int = 0) -> float:
    """Top-1 accuracy on (test_x, test_y) of BatchNorm1d(affine=False) -> Linear trained on
    (train_x, train_y) with Adam (no weight decay). x: (N, D) float, y: (N,) long."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    n_classes = int(max(train_y.max(), test_y.max())) + 1
    head = nn.Sequential(nn.BatchNorm1d(train_x.shape[1], affine=False),
                         nn.Linear(train_x.shape[1], n_classes))
    opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=0.0)
    head.train()
    for _ in range(epochs):
        perm = torch.randperm(len(train_x), generator=gen)
        for s in range(0, len(perm), batch_size):
            b = perm[s:s + batch_size]
            if len(b) < 2:  # BatchNorm needs two samples for a batch variance
                continue
            loss = F.cross_entropy(head(train_x[b]), train_y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    head.eval()  # BatchNorm's running statistics of the train features
    with torch.no_grad():
        return (head(test_x).argmax(1) == test_y).float().mean().item()


# --- features -----------------------------------------------------------------------------------

@torch.no_grad()
def probe_features(model, latents: torch.Tensor, prompts: list[list[int]], mode: str,
                   layers: tuple[int, ...], t: float, batch_size: int,
                   seed: int = 0) -> dict[int, torch.Tensor]:
    """{layer: (N, D)} image-token hidden states, mean-pooled over the image tokens.
    understanding: I2T layout, clean latents (t = 0); generation: T2I layout after the prompt,
    latents noised at `t` (noise from a seeded generator, so every run sees the same noise)."""
    from xfusion.model import Sample
    gen = torch.Generator().manual_seed(seed)
    out: dict[int, list[torch.Tensor]] = {l: [] for l in layers}
    for s in tqdm(range(0, len(latents), batch_size), desc=f"probe features ({mode})",
                  leave=False):
        if mode == "understanding":
            samples = [Sample("i2t", [], x, 0.0) for x in latents[s:s + batch_size]]
        else:
            samples = [Sample("t2i", p, x, t)
                       for x, p in zip(latents[s:s + batch_size], prompts[s:s + batch_size])]
        hidden = model.image_hidden_states(model.build_batch(samples, generator=gen), layers)
        for l in layers:
            out[l].append(hidden[l].float().mean(1).cpu())  # (B, P, D) -> (B, D)
    return {l: torch.cat(v) for l, v in out.items()}


def split_inputs(scenes: str, latents: str, captions: str, tokenizer, max_tokens: int):
    """Latents, prompts (caption ids as training holds them) and label dicts of one split, in
    the latents file's order."""
    x, ids = load_latents(latents)
    rows = records_by_id(scenes)  # ids from the latents: the data stages checked these lines
    caps = {i: r["caption"] for i, r in records_by_id(captions, ("caption",)).items()}
    missing = [i for i in ids if i not in rows or i not in caps]
    if missing:
        raise SystemExit(f"{latents}: {len(missing)} ids lack a scene in {scenes} or a caption in "
                         f"{captions} (first: {missing[0]})")
    labels = [rows[i].get("labels") for i in ids]
    if any(l is None for l in labels):
        raise SystemExit(f"{scenes}: records without `labels`; the linear probe needs a "
                         "labelled set (tiny world: shape/colour; paper: an ImageNet-style set)")
    prompts = encode_captions(tokenizer, [caps[i] for i in ids], max_tokens)
    return x, prompts, labels


def encode_labels(train: list[dict], test: list[dict], task: str):
    classes = sorted({l[task] for l in train})
    index = {c: k for k, c in enumerate(classes)}
    unseen = sorted({l[task] for l in test} - set(classes))
    if unseen:
        raise SystemExit(f"linear probe {task}: held-out classes {unseen} never seen in training")
    return (torch.tensor([index[l[task]] for l in train]),
            torch.tensor([index[l[task]] for l in test]), len(classes))


def main(argv: list[str] | None = None) -> dict:
    p = metric_parser(__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="R/runs/RUN/steps/STEP")
    for split in ("train-", ""):
        p.add_argument(f"--{split}scenes", required=True)
        p.add_argument(f"--{split}latents", required=True)
        p.add_argument(f"--{split}captions", required=True, help="generation-mode prompts")
    args = p.parse_args(argv)
    cfg = load_config(args)
    e = cfg.evaluation
    model, tokenizer = load_xfusion(args.model)
    data = {"train": split_inputs(args.train_scenes, args.train_latents, args.train_captions,
                                  tokenizer, cfg.data.max_caption_tokens),
            "heldout": split_inputs(args.scenes, args.latents, args.captions, tokenizer,
                                    cfg.data.max_caption_tokens)}
    tasks = sorted(data["train"][2][0])
    per_task: dict = {task: {mode: {} for mode in MODES} for task in tasks}
    for mode in MODES:
        feats = {split: probe_features(model, x, prompts, mode, e.probe_layers,
                                       e.probe_t_generation, e.sample_batch_size, cfg.seed)
                 for split, (x, prompts, _) in data.items()}
        for task in tasks:
            y_train, y_test, _ = encode_labels(data["train"][2], data["heldout"][2], task)
            for layer in e.probe_layers:
                per_task[task][mode][str(layer)] = linear_probe(
                    feats["train"][layer], y_train, feats["heldout"][layer], y_test,
                    lr=e.probe_lr, epochs=e.probe_epochs, batch_size=e.probe_batch_size,
                    seed=cfg.seed)
    primary = PRIMARY_TASK if PRIMARY_TASK in per_task else tasks[0]
    value = max(per_task[primary]["understanding"].values())
    return write_metric(args.out, "probe", value, cfg=cfg, job="linear_probe",
                        run=args.run, step=args.step,
                        n=len(data["heldout"][2]),
                        details={"task": primary, "per_layer": per_task[primary],
                                 "per_task": per_task, "n_train": len(data["train"][2]),
                                 "t_generation": e.probe_t_generation})


if __name__ == "__main__":
    main()
