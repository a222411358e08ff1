"""Linear probe of the vision tower's features per layer (X-Fusion Supp. C.3, Fig. D).

References:
- X-Fusion Supp. C.3: features from the vision tower of the trained model, a linear head after a
  parameter-free normalisation, Adam without weight decay, lr 6.4e-3, batch 16,384, top-1 on
  ImageNet's validation set; two ways to read them: understanding mode (clean image, t = 0, I2T
  layout) and generation mode (a text prompt, then the image noised at t = 20/1000, T2I layout).
- He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022, and REPA (Yu et al.
  2024) whose probes X-Fusion follows: `BatchNorm1d(affine=False)` before the linear head,
  features mean-pooled over tokens.

Data: two probe sets of xfusion.probe_data (latents + class labels of an ImageFolder split:
ImageNet train / val at paper scale, the tiny world's images by shape at tiny scale). Features:
`XFusionModel.image_hidden_states(batch, layers)` (the image tokens after each decoder layer,
1-based), mean-pooled over the image tokens. Generation mode's prompt is
`evaluation.probe_prompt`, the same for every image (Supp. C.3 names none for ImageNet; a class
name would let the text, not the image, give the label away). The probe trains on the train
set's features and reports top-1 on the val set's: `value` = the best understanding-mode
accuracy over layers, `details.per_layer` = {mode: {layer: accuracy}}. The head trains on the
model's device, `evaluation.probe_batch_size` features at a time (capped at the train set size).

    python -m eval.linear_probe --config C --run RUN --step STEP --model R/runs/RUN/steps/STEP \
        --train R/probe/train.safetensors --val R/probe/val.safetensors --out F
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from eval.common import device, load_config, load_xfusion, metric_parser, write_metric
from xfusion.model.sequence import encode_captions
from xfusion.probe_data import ProbeSet, load_probe_set

MODES = ("understanding", "generation")


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                 test_y: torch.Tensor, *, lr: float, epochs: int, batch_size: int,
                 seed: int = 0, device: torch.device | str = "cpu") -> float:
    """Top-1 accuracy on (test_x, test_y) of BatchNorm1d(affine=False) -> Linear trained on
    (train_x, train_y) with Adam (no weight decay). x: (N, D) float, y: (N,) long; the features
    stay where they are, each batch moves to `device`, where the head trains."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    n_classes = int(max(train_y.max(), test_y.max())) + 1
    head = nn.Sequential(nn.BatchNorm1d(train_x.shape[1], affine=False),
                         nn.Linear(train_x.shape[1], n_classes)).to(device)
    opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=0.0)
    head.train()
    for _ in range(epochs):
        perm = torch.randperm(len(train_x), generator=gen)
        for s in range(0, len(perm), batch_size):
            b = perm[s:s + batch_size]
            if len(b) < 2:  # BatchNorm needs two samples for a batch variance
                continue
            loss = F.cross_entropy(head(train_x[b].to(device)), train_y[b].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    head.eval()  # BatchNorm's running statistics of the train features
    correct = 0
    with torch.no_grad():
        for s in range(0, len(test_x), batch_size):
            pred = head(test_x[s:s + batch_size].to(device)).argmax(1).cpu()
            correct += int((pred == test_y[s:s + batch_size]).sum())
    return correct / len(test_x)


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


def val_labels(train: ProbeSet, val: ProbeSet) -> torch.Tensor:
    """The val set's labels as indices into the train set's classes (both sorted by name, but
    a val folder may lack some classes); a val class the train set lacks is an error."""
    index = {name: k for k, name in enumerate(train.classes)}
    unseen = sorted(set(val.classes[k] for k in val.labels.unique().tolist()) - set(index))
    if unseen:
        raise SystemExit(f"linear probe: val classes {unseen[:5]} have no train folder")
    return torch.tensor([index[val.classes[k]] for k in val.labels.tolist()], dtype=torch.int64)


def main(argv: list[str] | None = None) -> dict:
    p = metric_parser(__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="R/runs/RUN/steps/STEP")
    p.add_argument("--train", required=True, help="R/probe/train.safetensors (xfusion.probe_data)")
    p.add_argument("--val", required=True, help="R/probe/val.safetensors")
    args = p.parse_args(argv)
    cfg = load_config(args)
    e = cfg.evaluation
    model, tokenizer = load_xfusion(args.model)
    sets = {"train": load_probe_set(args.train), "val": load_probe_set(args.val)}
    labels = {"train": sets["train"].labels, "val": val_labels(sets["train"], sets["val"])}
    prompt = encode_captions(tokenizer, [e.probe_prompt], cfg.data.max_caption_tokens)[0]
    batch_size = min(e.probe_batch_size, len(labels["train"]))
    per_layer: dict = {mode: {} for mode in MODES}
    for mode in MODES:
        feats = {split: probe_features(model, s.latents, [prompt] * len(s.ids), mode,
                                       e.probe_layers, e.probe_t_generation, e.sample_batch_size,
                                       cfg.seed)
                 for split, s in sets.items()}
        for layer in e.probe_layers:
            per_layer[mode][str(layer)] = linear_probe(
                feats["train"][layer], labels["train"], feats["val"][layer], labels["val"],
                lr=e.probe_lr, epochs=e.probe_epochs, batch_size=batch_size, seed=cfg.seed,
                device=device())
        del feats  # one mode's features at a time (N x width per layer)
    value = max(per_layer["understanding"].values())
    return write_metric(args.out, "probe", value, cfg=cfg, job="linear_probe",
                        run=args.run, step=args.step, n=len(labels["val"]),
                        details={"per_layer": per_layer, "n_train": len(labels["train"]),
                                 "n_classes": len(sets["train"].classes),
                                 "batch_size": batch_size, "prompt": e.probe_prompt,
                                 "t_generation": e.probe_t_generation})


if __name__ == "__main__":
    main()
