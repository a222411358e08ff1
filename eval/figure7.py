"""X-Fusion Fig. 7 as a figure: the pretrained DiT alone, X-Fusion (Pretrained DiT) and vanilla
X-Fusion on the same prompts (samples side by side) and the same images (captions side by side).

    python -m eval.figure7 --config C --run x_fuse_dit --dit R/dit/<name> --tokenizer R/tokenizer \
        --samples "X-Fusion (Pretrained DiT)=R/samples/x_fuse_dit/STEP" \
                  "X-Fusion=R/samples/x_fuse/STEP" --out R/figures/figure7.png R/figures/figure7.pdf

The X-Fusion columns are the sample rules' own files (t2i/index.jsonl and its PNGs, i2t.jsonl),
so the figure shows what FID and BLIP measured. The DiT column is drawn here for the first
`--n` prompts, from the same initial noise as xfusion.sample (seeded by (seed, index)) and with
the same sampler settings (`evaluation`); a DiT writes no captions, so its I2T cells are empty.
At paper scale the DiT's own text encoders are no part of this pipeline: the column is left
out (`model.dit.source: pretrained`).

References: X-Fusion Sec. 7.2 and Fig. 7.
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from eval.plots import save  # noqa: E402
from xfusion.config import RunConfig, load_run  # noqa: E402
from xfusion.data import resolve_image  # noqa: E402
from xfusion.io import read_jsonl  # noqa: E402

DIT_LABEL = "Pretrained DiT alone"


def dit_samples(cfg: RunConfig, dit_dir: Path, tokenizer_dir: Path,
                prompts: list[dict]) -> list[Image.Image]:
    """The tiny DiT's images for `prompts` (index.jsonl entries), noise as xfusion.sample's."""
    from xfusion.codec import build_codec
    from xfusion.model.sequence import encode_captions
    from xfusion.pretrain_dit import generate, load_tiny_dit
    from xfusion.sample import to_image
    from xfusion.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    codec = build_codec(cfg.model.codec)
    shape = codec.latent_shape(cfg.data.image_size)  # (C, h, w)
    model = load_tiny_dit(dit_dir, cfg, len(tok), tuple(shape[1:]))
    noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(
        cfg.seed * 1_000_003 + e["index"])) for e in prompts])
    ev = cfg.evaluation
    latents = generate(model, encode_captions(tok, [e["prompt"] for e in prompts],
                                              cfg.data.max_caption_tokens),
                       tok.pad_token_id, noise, ev.sample_steps, ev.cfg_scale, ev.sample_shift)
    with torch.no_grad():
        return [to_image(px) for px in codec.decode(latents)]


def panel(prompts: list[dict], columns: dict[str, list[Image.Image | None]],
          images: list[Image.Image], captions: dict[str, list[str | None]]) -> plt.Figure:
    """T2I rows (prompt | one image per column), then I2T rows (image | one caption per column)."""
    labels = list(columns)
    rows = len(prompts) + len(images)
    fig, axes = plt.subplots(rows, len(labels) + 1, figsize=(2.4 * (len(labels) + 1), 2.0 * rows),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for j, label in enumerate(labels):
        axes[0, j + 1].set_title(label, fontsize=9)
    for i, entry in enumerate(prompts):
        axes[i, 0].text(0, 0.5, textwrap.fill(entry["prompt"], 28), fontsize=7, va="center")
        for j, label in enumerate(labels):
            if columns[label][i] is not None:
                axes[i, j + 1].imshow(columns[label][i])
    for k, image in enumerate(images):
        i = len(prompts) + k
        axes[i, 0].imshow(image)
        for j, label in enumerate(labels):
            text = captions[label][k]
            axes[i, j + 1].text(0, 0.5, "-" if text is None else textwrap.fill(text, 28),
                                fontsize=7, va="center")
    fig.suptitle("X-Fusion Fig. 7: T2I samples (top), I2T captions (bottom)", fontsize=10)
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--run", required=True, help="the x_fuse_dit run (its model.dit, seed)")
    p.add_argument("--dit", required=True, type=Path, help="R/dit/<name>")
    p.add_argument("--tokenizer", required=True, type=Path, help="R/tokenizer")
    p.add_argument("--samples", nargs="+", required=True, help="LABEL=R/samples/RUN/STEP")
    p.add_argument("--n", type=int, default=4, help="prompts and images shown")
    p.add_argument("--out", nargs="+", required=True, help="R/figures/figure7.{png,pdf}")
    args = p.parse_args(argv)
    cfg = load_run(args.config, args.run)
    runs = dict(s.split("=", 1) for s in args.samples)
    first = Path(next(iter(runs.values())))
    prompts = read_jsonl(first / "t2i" / "index.jsonl")[:args.n]
    i2t_rows = {label: read_jsonl(Path(d) / "i2t.jsonl")[:args.n] for label, d in runs.items()}
    shown = i2t_rows[next(iter(runs))]
    images = [Image.open(resolve_image(r["image"], first / "i2t.jsonl")).convert("RGB")
              for r in shown]
    columns, captions = {}, {}
    if cfg.model.dit.source == "tiny":
        columns[DIT_LABEL] = dit_samples(cfg, args.dit, args.tokenizer, prompts)
        captions[DIT_LABEL] = [None] * len(images)
    for label, d in runs.items():
        by_index = {e["index"]: e for e in read_jsonl(Path(d) / "t2i" / "index.jsonl")}
        columns[label] = [Image.open(Path(d) / "t2i" / by_index[e["index"]]["file"])
                          for e in prompts]
        captions[label] = [r["caption"] for r in i2t_rows[label]]
    save(panel(prompts, columns, images, captions), args.out)
    print(f"wrote {', '.join(args.out)}")


if __name__ == "__main__":
    main()
