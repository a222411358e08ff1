"""Encode every captioned image once; every run then trains on the stored latents.

`python -m xfusion.latents --config C --captions R/captions/<split>.jsonl --out R/latents/<split>.safetensors`
writes a safetensors file with one tensor `latents` (N, C, h, w), already shifted and scaled by
the codec, in the order of the captions file; metadata `ids` (JSON list of image ids) and `codec`
(JSON of `model.codec`). `load_latents(path) -> (latents, ids)`.

References: X-Fusion Sec. 4 (VAE latents); DESIGN.md "Encode the dataset with the VAE once".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from xfusion.codec import ImageCodec, build_codec
from xfusion.config import load_run
from xfusion.data import load_pixels, resolve_image
from xfusion.io import atomic_path, read_jsonl


def encode_images(paths: list[Path], codec: ImageCodec, image_size: int, batch_size: int,
                  device: torch.device) -> torch.Tensor:
    """(N, C, h, w) latents of the images at `paths`, in order."""
    chunks = []
    for i in tqdm(range(0, len(paths), batch_size), desc="encode", unit="batch"):
        pixels = torch.stack([load_pixels(p, image_size) for p in paths[i:i + batch_size]])
        chunks.append(codec.encode(pixels.to(device)).cpu())  # (b, C, h, w)
    return torch.cat(chunks)


def save_latents(path: str | Path, latents: torch.Tensor, ids: list[str], codec_cfg: dict) -> None:
    if latents.shape[0] != len(ids):
        raise ValueError(f"{len(ids)} ids for {latents.shape[0]} latents")
    metadata = {"ids": json.dumps(ids), "codec": json.dumps(codec_cfg, sort_keys=True)}
    with atomic_path(path) as tmp:
        save_file({"latents": latents.contiguous()}, str(tmp), metadata=metadata)


def load_latents(path: str | Path) -> tuple[torch.Tensor, list[str]]:
    """(latents (N, C, h, w), ids) from a file written by `save_latents`."""
    with safe_open(str(path), framework="pt") as fh:
        metadata = fh.metadata() or {}
        if "ids" not in metadata:
            raise ValueError(f"{path}: no `ids` metadata; rerun python -m xfusion.latents")
        return fh.get_tensor("latents"), json.loads(metadata["ids"])


def main() -> None:
    parser = argparse.ArgumentParser(description="Encode captioned images to latents once.")
    parser.add_argument("--config", required=True)
    parser.add_argument("--captions", required=True, type=Path, help="R/captions/<split>.jsonl")
    parser.add_argument("--out", required=True, type=Path, help="R/latents/<split>.safetensors")
    args = parser.parse_args()
    cfg = load_run(args.config)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = read_jsonl(args.captions)
    paths = [resolve_image(r["image"], args.captions) for r in rows]
    codec = build_codec(cfg.model.codec).to(device)
    latents = encode_images(paths, codec, cfg.data.image_size, cfg.data.encode_batch_size, device)
    save_latents(args.out, latents, [r["id"] for r in rows], dataclasses.asdict(cfg.model.codec))
    print(f"wrote {tuple(latents.shape)} latents to {args.out}")


if __name__ == "__main__":
    main()
