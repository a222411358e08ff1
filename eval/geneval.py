"""T2I attribute accuracy (`t2i_attr_acc`): does a generated image show the prompt's primary
object in the prompt's shape and colour? A ground-truth check beside FID and CLIP score.

References: Ghosh et al., "GenEval: An Object-Focused Framework for Evaluating Text-to-Image
Alignment", NeurIPS 2023 (a detector checks each prompt's objects, colours, positions and
counts; the score is the share of images where the check passes). Here the detector is
`eval.attribute_classifier`, trained on the tiny world's real images, and the prompt's truth is
the scene record the prompt was composed from (`xfusion.caption`, scene backend).

Sample i of R/samples/RUN/STEP/t2i/index.jsonl (`{"index", "id", "prompt", "file"}`) was made
from the held-out caption of image `id`, so its truth is that id's record in
R/world/heldout/scenes.jsonl. `value`: the share of images whose primary object (the record's
first object, its `labels`) has the right shape AND colour at its cell. `details.accuracy` has
shape, colour, count (occupied cells), position (the layout of occupied cells) and objects (every
object's shape and colour); `details.chance` / `details.majority` what a uniform / a constant
guess scores; `details.classifier` the classifier's own accuracy on held-out real images.
Usable wherever scene records exist (`data.source: world`); at paper scale the rule is absent.

    python -m eval.geneval --config C --samples R/samples/RUN/STEP/t2i/index.jsonl \
        --scenes R/world/heldout/scenes.jsonl --classifier R/attribute_classifier \
        --run RUN --step STEP --out R/metrics/RUN/STEP/t2i_attr_acc.json
"""

from __future__ import annotations

import json
from pathlib import Path

from eval.attribute_classifier import AttributeClassifier, load_images, predict, read_scenes
from eval.attribute_classifier import score
from eval.common import load_config, metric_parser, write_metric
from xfusion.io import read_jsonl

METRIC = "t2i_attr_acc"


def main(argv: list[str] | None = None) -> dict:
    p = metric_parser(__doc__.split("\n")[0])
    p.add_argument("--samples", required=True, help='T2I samples index.jsonl ({"id", "file"})')
    p.add_argument("--scenes", required=True, help="R/world/heldout/scenes.jsonl (the prompts' "
                   "scene records)")
    p.add_argument("--classifier", required=True, help="R/attribute_classifier")
    args = p.parse_args(argv)
    cfg = load_config(args)
    samples = read_jsonl(args.samples)
    if not samples:
        raise SystemExit(f"{args.samples}: empty; nothing to evaluate")
    records = {r["id"]: r for r in read_scenes(args.scenes)}
    missing = [s["id"] for s in samples if s["id"] not in records]
    if missing:
        raise SystemExit(f"{args.samples}: {len(missing)} samples have no scene record in "
                         f"{args.scenes} (first: {missing[0]})")
    model = AttributeClassifier.load(args.classifier)
    pixels = load_images(samples, args.samples, "file", cfg.data.image_size)
    result = score(predict(model, pixels, args.batch_size),
                   [records[s["id"]]["scene"] for s in samples], cfg.data.max_shapes)
    quality = Path(args.classifier) / "quality.json"
    classifier = json.loads(quality.read_text())["accuracy"] if quality.exists() else None
    return write_metric(args.out, METRIC, result["accuracy"]["shape_colour"], cfg=cfg,
                        job="geneval", run=args.run, step=args.step, n=result["n"],
                        details={"accuracy": result["accuracy"], "chance": result["chance"],
                                 "majority": result["majority"], "classifier": classifier})


if __name__ == "__main__":
    main()
