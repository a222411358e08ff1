"""I2T caption attribute recall (`i2t_attr_recall`) and precision: which of the image's shapes,
colours, sizes, positions and object count a generated caption names, and how many of the
attributes it names are true. A ground-truth check beside the BLIP-2 ITM score.

References: the attribute and object precision/recall of caption evaluation against scene
graphs, e.g. SPICE (Anderson et al., ECCV 2016: F-score over scene-graph tuples) and CAPTURE
(Dong et al. 2024: object / attribute matching of detailed captions); here the scene graph is the
tiny world's own record, so no parser or synonym table is needed.

The vocabulary is the world's (`xfusion.data.world`: SHAPES, COLOURS, SIZES, POSITIONS) and the
captioner's count phrases (`xfusion.caption.COUNT_WORDS`, "two shapes"). A record's facts are
the set of (category, value) over its objects, plus its count; a caption's facts are the words of
that vocabulary it contains. Position words that start a relation ("to the left of the blue
square", `xfusion.caption.INVERSE`) are relations, not positions, unless followed by "the image".
Per caption, recall = |caption ∩ record| / |record| and precision = |caption ∩ record| /
|caption|; `value` is the mean recall, `details.precision` the mean precision over captions that
name anything. `details.objects` binds attributes: recall / precision of the (colour, shape)
pairs the caption writes side by side ("red circle"), which a caption of the right words in the
wrong pairs fails. `details.chance_precision` is what words drawn uniformly from each category
score. Usable wherever scene records exist (`data.source: world`); at paper scale the rule is
absent.

    python -m eval.caption_attributes --config C --captions R/samples/RUN/STEP/i2t.jsonl \
        --scenes R/world/heldout/scenes.jsonl --run RUN --step STEP \
        --out R/metrics/RUN/STEP/i2t_attr_recall.json
"""

from __future__ import annotations

import re
from statistics import mean

from eval.attribute_classifier import read_scenes
from eval.common import load_config, metric_parser, write_metric
from xfusion.caption import COUNT_WORDS, INVERSE
from xfusion.data.world import COLOURS, POSITIONS, SHAPES, SIZES
from xfusion.io import read_jsonl

METRIC = "i2t_attr_recall"
COUNTS = {phrase: n for n, phrase in enumerate(COUNT_WORDS) if n > 0}  # "two shapes" -> 2
VOCAB = {"shape": list(SHAPES), "colour": list(COLOURS), "size": list(SIZES),
         "position": list(POSITIONS), "count": list(COUNTS.values())}
# "left of" / "right of" begin a relation; "above" / "below" are not position words anyway.
RELATION_HEADS = {rel.split()[0] for rel in INVERSE if rel.split()[0] in POSITIONS}

Fact = tuple[str, object]  # (category, value)


def record_facts(scene: dict) -> set[Fact]:
    facts = {(c, o[c]) for o in scene["objects"] for c in ("shape", "colour", "size", "position")}
    return facts | {("count", len(scene["objects"]))}


def caption_facts(text: str) -> set[Fact]:
    words = re.findall(r"[a-z]+", text.lower())
    category = {w: c for c in ("shape", "colour", "size", "position") for w in VOCAB[c]}
    facts = set()
    for i, w in enumerate(words):
        if w not in category:
            continue
        if (category[w] == "position" and w in RELATION_HEADS and words[i + 1:i + 2] == ["of"]
                and words[i + 2:i + 4] != ["the", "image"]):
            continue  # "to the left of the blue square": a relation
        facts.add((category[w], w))
    joined = " ".join(words)
    facts |= {("count", n) for phrase, n in COUNTS.items()
              if re.search(rf"\b{phrase}\b", joined)}
    return facts


def record_pairs(scene: dict) -> set[tuple[str, str]]:
    return {(o["colour"], o["shape"]) for o in scene["objects"]}


def caption_pairs(text: str) -> set[tuple[str, str]]:
    words = re.findall(r"[a-z]+", text.lower())
    return {(a, b) for a, b in zip(words, words[1:]) if a in COLOURS and b in SHAPES}


def overlap(said: set, true: set) -> tuple[float, float | None]:
    """(recall, precision) of one caption; precision is None when it names nothing."""
    hit = len(said & true)
    return hit / len(true), (hit / len(said) if said else None)


def chance(scene: dict) -> dict[str, float]:
    """Per category: the chance that a value drawn uniformly from the vocabulary is true."""
    true = record_facts(scene)
    return {c: sum((c, v) in true for v in values) / len(values) for c, values in VOCAB.items()}


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return mean(values) if values else None


def score(captions: list[str], scenes: list[dict]) -> dict:
    """Mean attribute recall / precision of captions against their scenes, per category too."""
    per: dict = {"recall": [], "precision": [], "object_recall": [], "object_precision": []}
    by_cat: dict = {c: {"recall": [], "precision": []} for c in VOCAB}
    chances = []
    for text, scene in zip(captions, scenes, strict=True):
        said, true = caption_facts(text), record_facts(scene)
        r, p = overlap(said, true)
        per["recall"].append(r)
        per["precision"].append(p)
        r, p = overlap(caption_pairs(text), record_pairs(scene))
        per["object_recall"].append(r)
        per["object_precision"].append(p)
        for c in VOCAB:
            r, p = overlap({f for f in said if f[0] == c}, {f for f in true if f[0] == c})
            by_cat[c]["recall"].append(r)
            by_cat[c]["precision"].append(p)
        chances.append(chance(scene))
    return {"recall": mean(per["recall"]), "precision": _mean(per["precision"]),
            "n_naming": sum(p is not None for p in per["precision"]),
            "objects": {"recall": mean(per["object_recall"]),
                        "precision": _mean(per["object_precision"])},
            "per_category": {c: {k: _mean(v) for k, v in d.items()} for c, d in by_cat.items()},
            "chance_precision": mean(mean(ch.values()) for ch in chances),
            "chance_per_category": {c: mean(ch[c] for ch in chances) for c in VOCAB},
            "n": len(captions)}


def main(argv: list[str] | None = None) -> dict:
    p = metric_parser(__doc__.split("\n")[0])
    p.add_argument("--captions", required=True, help='I2T samples ({"id", "caption"} per line)')
    p.add_argument("--scenes", required=True, help="R/world/heldout/scenes.jsonl")
    args = p.parse_args(argv)
    cfg = load_config(args)  # a bad config or run name stops here, as in every metric
    rows = read_jsonl(args.captions)
    if not rows:
        raise SystemExit(f"{args.captions}: empty; nothing to evaluate")
    records = {r["id"]: r["scene"] for r in read_scenes(args.scenes)}
    missing = [r["id"] for r in rows if r["id"] not in records]
    if missing:
        raise SystemExit(f"{args.captions}: {len(missing)} captions have no scene record in "
                         f"{args.scenes} (first: {missing[0]})")
    result = score([r["caption"] for r in rows], [records[r["id"]] for r in rows])
    n = result.pop("n")
    return write_metric(args.out, METRIC, result.pop("recall"), cfg=cfg,
                        job="caption_attributes", run=args.run, step=args.step, n=n,
                        details=result)


if __name__ == "__main__":
    main()
