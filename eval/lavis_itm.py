"""BLIP-2 ITM match probabilities with LAVIS, run inside the LAVIS environment.

Not imported by the pipeline: `eval.itm` (backend `lavis`) runs this file with the Python of
workflow/envs/lavis.yaml, because LAVIS pins transformers < 4.27. It therefore imports nothing
from this repository. Input: a JSONL of `{"image": <absolute path>, "caption": str}`; output: one
P(match) per line, in input order.

References: Li et al. 2023 (BLIP-2); LAVIS `load_model_and_preprocess("blip2_image_text_matching",
"pretrain")` and `model({"image", "text_input"}, match_head="itm")`, softmax, class 1.

    <lavis python> eval/lavis_itm.py --pairs pairs.jsonl --out scores.txt [--batch-size 32]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# LAVIS would fetch these on first use; the pipeline runs offline, so they must be in place.
WEIGHTS = ("blip2_pretrained.pth", "eva_vit_g.pth")
URL = "https://storage.googleapis.com/sfr-vision-language-research/LAVIS/models/BLIP2/"


def check_weights() -> None:
    import torch
    found = Path(torch.hub.get_dir()) / "checkpoints"
    missing = [w for w in WEIGHTS if not (found / w).exists()]
    if missing:
        sys.exit(f"lavis_itm: {', '.join(missing)} not in {found}: itm_backend=lavis needs the "
                 f"LAVIS BLIP-2 weights there (from {URL}<name>), or use itm_backend=transformers")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args()
    check_weights()
    import torch
    from PIL import Image
    from lavis.models import load_model_and_preprocess

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model, vis, txt = load_model_and_preprocess("blip2_image_text_matching", "pretrain",
                                                    device=dev, is_eval=True)
    except Exception as err:  # LAVIS reports a missing download as whatever urllib raised
        sys.exit(f"lavis_itm: could not load blip2_image_text_matching/pretrain ({err}); its "
                 f"weights ({', '.join(WEIGHTS)}, bert-base-uncased) must be downloadable or "
                 "already cached")
    pairs = [json.loads(line) for line in open(args.pairs) if line.strip()]
    probs: list[float] = []
    with torch.no_grad():
        for s in range(0, len(pairs), args.batch_size):
            chunk = pairs[s:s + args.batch_size]
            image = torch.stack([vis["eval"](Image.open(r["image"]).convert("RGB"))
                                 for r in chunk]).to(dev)
            text = [txt["eval"](r["caption"]) for r in chunk]
            logits = model({"image": image, "text_input": text}, match_head="itm")  # (B, 2)
            probs += logits.float().softmax(-1)[:, 1].tolist()
            print(f"lavis_itm: {len(probs)}/{len(pairs)}", file=sys.stderr)
    tmp = Path(args.out).with_suffix(".tmp")
    tmp.write_text("".join(f"{x:.8f}\n" for x in probs))
    os.replace(tmp, args.out)  # atomic, like every output of the pipeline


if __name__ == "__main__":
    main()
