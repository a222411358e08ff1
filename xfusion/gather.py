"""Gather a split's shards (xfusion.shards) into the split's one file, which every downstream
stage reads unchanged.

`python -m xfusion.gather captions --shards R/captions/shards/<s>/<k>.jsonl … --out R/captions/<s>.jsonl`
concatenates the shards' captions in the order given (shard order); `python -m xfusion.gather
latents --shards R/latents/shards/<s>/<k>.safetensors … --out R/latents/<s>.safetensors` stacks
their latents with their ids (`xfusion.latents.save_latents`; empty shards passed over, shards
of different codecs refused). Both sum the shards' bad-input reports (`<shard stem>.bad_inputs.json`)
into the split's (`xfusion.data.report_path`): `n_bad`, `counts` and `items` summed, and
`per_shard` (each shard's file and n_bad). Outputs are written atomically.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from xfusion.data import BadInputs, report_path
from xfusion.io import atomic_path, atomic_write_json
from xfusion.latents import save_latents


def merge_reports(shards: list[Path], out: Path) -> None:
    """Sum the bad-input reports of `shards` (each `report_path(shard)`) into `report_path(out)`."""
    reports = []
    for shard in shards:
        path = report_path(shard)
        if not path.exists():
            raise SystemExit(f"{path}: missing; rerun the shard job that writes {shard}")
        reports.append(json.loads(path.read_text()))
    policies = {r["policy"] for r in reports}
    if len(policies) > 1:
        raise SystemExit(f"{out}: its shards ran under different data.bad_input_policy values "
                         f"{sorted(policies)}; rerun them with one config")
    # the report format and its counts are BadInputs'; the shards' items, in shard order
    merged = BadInputs(policies.pop() if policies else "skip",
                       [item for r in reports for item in r["items"]])
    merged.finish(report_path(out), extra={"per_shard": [
        {"shard": str(s), "n_bad": r["n_bad"]} for s, r in zip(shards, reports)]})


def gather_captions(shards: list[Path], out: Path) -> int:
    """Concatenate the shards' jsonl files into `out` in the order given; returns the lines."""
    n = 0
    with atomic_path(out) as tmp, open(tmp, "wb") as dst:
        for shard in tqdm(shards, desc="gather captions", unit="shard"):
            data = shard.read_bytes()
            if data and not data.endswith(b"\n"):
                raise SystemExit(f"{shard}: does not end with a newline; rerun its shard job")
            dst.write(data)
            n += data.count(b"\n")
    merge_reports(shards, out)
    return n


def _latent_meta(shard: Path) -> tuple[list[str], str, tuple[int, ...], str]:
    """(ids, codec metadata, latents shape, dtype name) of a shard, its tensor left unread."""
    with safe_open(str(shard), framework="pt") as fh:
        meta = fh.metadata() or {}
        if "ids" not in meta or "latents" not in fh.keys():
            raise SystemExit(f"{shard}: not a latents file of xfusion.latents; rerun its shard job")
        sliced = fh.get_slice("latents")
        return json.loads(meta["ids"]), meta.get("codec", "{}"), tuple(sliced.get_shape()), \
            sliced.get_dtype()


def gather_latents(shards: list[Path], out: Path) -> tuple[int, ...]:
    """Stack the shards' latents into `out` in the order given (empty shards passed over);
    returns the latents' shape. The split's tensor is filled shard by shard: the peak memory
    is the split's latents plus one shard's (and safetensors' copy while writing)."""
    metas = {s: _latent_meta(s) for s in shards}
    full = [s for s in shards if metas[s][0]]
    if not full:
        merge_reports(shards, out)
        raise SystemExit(f"{out}: no latents in any of its {len(shards)} shards; see "
                         f"{report_path(out)}")
    kinds = {(metas[s][1], metas[s][2][1:], metas[s][3]) for s in full}
    if len(kinds) > 1:
        raise SystemExit(f"{out}: its shards differ in codec, latent shape or dtype "
                         f"({sorted((k[1], k[2]) for k in kinds)}); rerun the shard jobs with "
                         "one config")
    ids = [i for s in full for i in metas[s][0]]
    if len(set(ids)) != len(ids):
        raise SystemExit(f"{out}: an image id is in more than one shard; rerun the data stage")
    latents, row = None, 0
    for shard in tqdm(full, desc="gather latents", unit="shard"):
        with safe_open(str(shard), framework="pt") as fh:
            part = fh.get_tensor("latents")  # (n_k, C, h, w)
        if part.shape[0] != len(metas[shard][0]):
            raise SystemExit(f"{shard}: {part.shape[0]} latents for {len(metas[shard][0])} ids")
        if latents is None:
            latents = torch.empty((len(ids), *part.shape[1:]), dtype=part.dtype)  # (N, C, h, w)
        latents[row:row + part.shape[0]] = part
        row += part.shape[0]
    save_latents(out, latents, ids, json.loads(metas[full[0]][1]))
    merge_reports(shards, out)
    return tuple(latents.shape)


def main() -> None:
    parser = argparse.ArgumentParser(description="Gather a split's shards into its one file.")
    parser.add_argument("kind", choices=("captions", "latents"))
    parser.add_argument("--shards", required=True, nargs="+", type=Path,
                        help="the split's shard files, in shard order")
    parser.add_argument("--out", required=True, type=Path,
                        help="R/captions/<split>.jsonl or R/latents/<split>.safetensors")
    args = parser.parse_args()
    if args.kind == "captions":
        print(f"gathered {gather_captions(args.shards, args.out)} captions from "
              f"{len(args.shards)} shards into {args.out}")
    else:
        print(f"gathered {gather_latents(args.shards, args.out)} latents from "
              f"{len(args.shards)} shards into {args.out}")


if __name__ == "__main__":
    main()
