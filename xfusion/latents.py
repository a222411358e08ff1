"""Encode every captioned image once; every run then trains on the stored latents.

`python -m xfusion.latents --config C --captions R/captions/<split>.jsonl --out R/latents/<split>.safetensors`
writes a safetensors file with one tensor `latents` (N, C, h, w), already shifted and scaled by
the codec, in the order of the captions file; metadata `ids` (JSON list of image ids) and `codec`
(JSON of `model.codec`). `load_latents(path) -> (latents, ids)`.

Bad inputs (xfusion.data, `data.bad_input_policy`): an undecodable or incomplete line of the
captions file, an empty caption, a missing, corrupt or truncated image. `skip` leaves the record
out of the latents (training then never sees it) and names each (file, line) in
`<out stem>.bad_inputs.json` beside `<out>`; `stop` exits naming the first.

Sharded (xfusion.shards): the rule `latents` runs it once per shard, `--captions
R/captions/shards/<split>/<k>.jsonl --out R/latents/shards/<split>/<k>.safetensors --allow-empty`
(an empty shard writes a file without latents); `python -m xfusion.gather latents` stacks them.

References: X-Fusion Sec. 4 (VAE latents); DESIGN.md "Encode the dataset with the VAE once".
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from xfusion.codec import ImageCodec, build_codec
from xfusion.config import RunConfig, load_run
from xfusion.data import (BadInputs, captioned_records, load_pixels, record_image, report_path,
                          to_pixels)
from xfusion.io import atomic_path


def encode_pixels(pixels: Iterable[torch.Tensor], codec: ImageCodec, batch_size: int,
                  device: torch.device) -> torch.Tensor:
    """(N, C, h, w) latents of a stream of (3, H, W) images, in order, `batch_size` at a time."""
    chunks, batch = [], []
    for px in pixels:
        batch.append(px)
        if len(batch) == batch_size:
            chunks.append(codec.encode(torch.stack(batch).to(device)).cpu())  # (b, C, h, w)
            batch = []
    if batch:
        chunks.append(codec.encode(torch.stack(batch).to(device)).cpu())
    return torch.cat(chunks)


def encode_images(paths: list[Path], codec: ImageCodec, image_size: int, batch_size: int,
                  device: torch.device) -> torch.Tensor:
    """(N, C, h, w) latents of the images at `paths`, in order."""
    return encode_pixels((load_pixels(p, image_size) for p in paths), codec, batch_size, device)


def usable_pixels(records: list[tuple[int, dict]], captions: Path, image_size: int,
                  bad: BadInputs, ids: list[str]) -> Iterator[torch.Tensor]:
    """Pixels of each record whose image is whole, in order; appends its id to `ids` as it
    goes (the others are bad inputs)."""
    for line, row in tqdm(records, desc="encode", unit="img"):
        if (img := record_image(row, captions, line, bad)) is not None:
            ids.append(row["id"])
            yield to_pixels(img, row["image"], image_size)


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


def encode_split(captions: Path, out: Path, cfg: RunConfig, device: torch.device,
                 allow_empty: bool = False) -> tuple:
    """Write `out` (and its bad-input report) from the captions file; returns the latents' shape.
    Without a usable record it stops, unless `allow_empty` (one shard of a split,
    xfusion.shards): then `out` holds no latents (shape (0,), no ids) and the codec is not
    loaded; the gather (xfusion.gather) checks the split as a whole."""
    bad = BadInputs(cfg.data.bad_input_policy)
    records = captioned_records(captions, bad, keys=("id", "image"))
    ids: list[str] = []
    pixels = usable_pixels(records, captions, cfg.data.image_size, bad, ids)
    if (first := next(pixels, None)) is None and allow_empty:
        save_latents(out, torch.zeros(0), [], dataclasses.asdict(cfg.model.codec))
        bad.finish(report_path(out))
        return (0,)
    if first is None:
        bad.finish(report_path(out))
        raise SystemExit(f"{captions}: no record with a caption and a whole image; see "
                         f"{report_path(out)}")
    codec = build_codec(cfg.model.codec).to(device)
    latents = encode_pixels(itertools.chain([first], pixels), codec,
                            cfg.data.encode_batch_size, device)
    save_latents(out, latents, ids, dataclasses.asdict(cfg.model.codec))
    bad.finish(report_path(out))
    return tuple(latents.shape)


def main() -> None:
    parser = argparse.ArgumentParser(description="Encode captioned images to latents once.")
    parser.add_argument("--config", required=True)
    parser.add_argument("--captions", required=True, type=Path, help="R/captions/<split>.jsonl")
    parser.add_argument("--out", required=True, type=Path, help="R/latents/<split>.safetensors")
    parser.add_argument("--allow-empty", action="store_true",
                        help="one shard of a split (xfusion.shards): no usable record writes an "
                             "empty file instead of stopping")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = encode_split(args.captions, args.out, load_run(args.config), device, args.allow_empty)
    print(f"wrote {shape} latents to {args.out}")


if __name__ == "__main__":
    main()
