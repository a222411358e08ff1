"""The linear probe's labelled images, encoded once (X-Fusion Supp. C.3: ImageNet).

`python -m xfusion.probe_data --config C --images DIR --out R/probe/<split>.safetensors`
reads the ImageFolder `DIR` (`data.probe.train_dir` or `data.probe.val_dir`; the tiny world's
`R/world/probe/{train,val}` when null; xfusion.data.image_folder), at most
`data.probe.max_per_class` images per class, centre-crops and resizes each to `data.image_size`
as the folder reader does with training images, and encodes them with the image codec as
xfusion.latents does. The safetensors file holds `latents` (N, C, h, w) and `labels` (N,) int64
(indices into `classes`); metadata `ids` (each image's path under DIR), `classes` (the sorted
class folder names), `codec`. `load_probe_set(path) -> ProbeSet`.

Bad inputs (xfusion.data, `data.bad_input_policy`): a corrupt or truncated image. `skip` leaves
it out and names it in `<out stem>.bad_inputs.json` beside `<out>`; `stop` exits naming it.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from xfusion.codec import build_codec
from xfusion.config import RunConfig, load_run
from xfusion.data import BadInputs, read_image, report_path, to_pixels
from xfusion.data.folder import centre_crop_resize
from xfusion.data.image_folder import image_folder_samples
from xfusion.io import atomic_path
from xfusion.latents import encode_pixels


@dataclasses.dataclass(frozen=True)
class ProbeSet:
    latents: torch.Tensor  # (N, C, h, w)
    labels: torch.Tensor  # (N,) int64, indices into classes
    classes: list[str]
    ids: list[str]


def save_probe_set(path: str | Path, probe: ProbeSet, codec_cfg: dict) -> None:
    if not len(probe.ids) == len(probe.labels) == probe.latents.shape[0]:
        raise ValueError(f"{len(probe.ids)} ids, {len(probe.labels)} labels for "
                         f"{probe.latents.shape[0]} latents")
    metadata = {"ids": json.dumps(probe.ids), "classes": json.dumps(probe.classes),
                "codec": json.dumps(codec_cfg, sort_keys=True)}
    with atomic_path(path) as tmp:
        save_file({"latents": probe.latents.contiguous(), "labels": probe.labels.contiguous()},
                  str(tmp), metadata=metadata)


def load_probe_set(path: str | Path) -> ProbeSet:
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
        if "classes" not in meta:
            raise SystemExit(f"{path}: not a probe set (no `classes` metadata); rerun "
                             "python -m xfusion.probe_data")
        return ProbeSet(fh.get_tensor("latents"), fh.get_tensor("labels"),
                        json.loads(meta["classes"]), json.loads(meta["ids"]))


def encode_probe_set(images: Path, out: Path, cfg: RunConfig, device: torch.device) -> ProbeSet:
    """Write `out` (and its bad-input report) from the ImageFolder `images`."""
    d = cfg.data
    samples, classes = image_folder_samples(images, d.probe.max_per_class)
    bad = BadInputs(d.bad_input_policy)
    ids: list[str] = []
    labels: list[int] = []

    def pixels():
        for path, label in tqdm(samples, desc=f"probe set {images}", unit="img"):
            if (img := read_image(path, bad)) is not None:
                ids.append(path.relative_to(images).as_posix())
                labels.append(label)
                yield to_pixels(centre_crop_resize(img, d.image_size), path)

    stream = pixels()
    if (first := next(stream, None)) is None:
        bad.finish(report_path(out))
        raise SystemExit(f"{images}: no whole image; see {report_path(out)}")
    codec = build_codec(cfg.model.codec).to(device)
    latents = encode_pixels(itertools.chain([first], stream), codec, d.encode_batch_size, device)
    probe = ProbeSet(latents, torch.tensor(labels, dtype=torch.int64), classes, ids)
    save_probe_set(out, probe, dataclasses.asdict(cfg.model.codec))
    bad.finish(report_path(out))
    return probe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--images", required=True, type=Path, help="an ImageFolder split")
    parser.add_argument("--out", required=True, type=Path, help="R/probe/<split>.safetensors")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    probe = encode_probe_set(args.images, args.out, load_run(args.config), device)
    print(f"wrote {tuple(probe.latents.shape)} latents of {len(probe.classes)} classes "
          f"to {args.out}")


if __name__ == "__main__":
    main()
