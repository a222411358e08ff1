"""The tiny world: seeded images of coloured shapes, a fact corpus and a tiny MMLU.

`python -m xfusion.data.world --config config/tiny.yaml --out results/tiny/world` writes
(layout of docs/INTERFACES.md):
  {train,heldout}/images/<id>.png, {train,heldout}/scenes.jsonl  one to `data.max_shapes`
      solid shapes on a plain background; the first object is always large and is the primary
      object whose shape and colour are the linear probe's `labels`;
  corpus.txt        text to pretrain the tiny Llama;
  mmlu/{dev,test}/<subject>_{dev,test}.csv   hendrycks layout, no header.

Why the corpus looks the way it does: a 4-layer, 128-wide Llama pretrained for
`model.base_lm.pretrain_steps` steps must beat chance on the tiny MMLU. Seeing each fact once is not enough for such a model, and neither is
knowing the fact without the multiple-choice format. So the corpus holds
  * `data.n_corpus_facts` fact lines: every fact in several phrasings, cycled so each appears
    several times ("a triangle has three sides." / "the number of sides of a triangle is three.");
  * `data.mmlu_practice_per_question` practice items per benchmark question, in
    lm-evaluation-harness's MMLU prompt format ("{question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\n
    Answer: X"), grouped under the harness's subject header like a few-shot prompt, each item with
    a distractor set or option order that no dev/test item of the same question uses. The model
    thus learns facts and format, and the benchmark still tests the fact under options it never saw.
  * `data.n_corpus_descriptions` descriptions of random scenes (no image; phrased by the scene
    captioner): the tiny LLM's "English". X-Fusion keeps the LLM frozen and relies on its
    language; a tiny LLM that never read a description cannot be steered into writing one.
The corpus is one text stream: a fact per line, practice blocks separated by blank lines; pack it
as one token stream rather than one document per line. Test answers are spread evenly over A-D.

Same seed -> byte-identical files (PNG without metadata, sorted JSON); another seed -> other files.

References: lm-evaluation-harness `mmlu` task (prompt "{{question}}\\nA. ..\\nAnswer:");
Hendrycks et al., "Measuring Massive Multitask Language Understanding" (CSV layout).
"""

from __future__ import annotations

import argparse
import csv
import io
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw
from tqdm import tqdm

from xfusion.caption import scene_caption  # the captioner's phrasing: one source of it
from xfusion.config import ConfigError, DataConfig, load_run
from xfusion.data import save_png
from xfusion.io import atomic_write_jsonl, atomic_write_text
from xfusion.mmlu import FEWSHOT_DELIMITER, LETTERS, Item, description, format_example

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS = {  # well separated in RGB so a tiny encoder tells them apart
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (235, 205, 30), "purple": (150, 60, 200), "orange": (245, 135, 25),
}
BACKGROUND = (235, 235, 235)
SIZES = {"small": 0.09, "large": 0.16}  # radius as a fraction of the image side
POSITIONS = {"left": (0.2, 0.5), "right": (0.8, 0.5), "top": (0.5, 0.2), "bottom": (0.5, 0.8),
             "centre": (0.5, 0.5)}  # centre of the shape, fractions of the image side
SUPERSAMPLE = 4  # draw large, then box-filter down: clean edges at 32 px, still deterministic


# --- images -----------------------------------------------------------------------------------

def sample_scene(rng: random.Random, max_shapes: int) -> dict:
    """Objects at distinct positions (so they never overlap) and a relation for each pair."""
    n = rng.randint(1, min(max_shapes, len(POSITIONS)))
    positions = rng.sample(list(POSITIONS), n)
    objects = [{"shape": rng.choice(SHAPES), "colour": rng.choice(list(COLOURS)),
                "size": "large" if i == 0 else rng.choice(list(SIZES)), "position": pos}
               for i, pos in enumerate(positions)]
    relations = [{"subject": i, "relation": relation(positions[i], positions[j]), "object": j}
                 for i in range(n) for j in range(i + 1, n)]
    return {"objects": objects, "relations": relations}


def relation(a: str, b: str) -> str:
    """Spatial relation of position `a` to position `b`; horizontal wins when both differ."""
    (ax, ay), (bx, by) = POSITIONS[a], POSITIONS[b]
    if ax != bx:
        return "left of" if ax < bx else "right of"
    return "above" if ay < by else "below"


def shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "cross":
        w = r / 3
        return [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w),
                (cx + r, cy + w), (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r),
                (cx - w, cy + w), (cx - r, cy + w), (cx - r, cy - w), (cx - w, cy - w)]
    raise ValueError(f"unknown shape {shape!r} (known: {', '.join(SHAPES)})")


def render(scene: dict, image_size: int) -> Image.Image:
    side = image_size * SUPERSAMPLE
    img = Image.new("RGB", (side, side), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for obj in scene["objects"]:
        fx, fy = POSITIONS[obj["position"]]
        cx, cy, r = fx * side, fy * side, SIZES[obj["size"]] * side
        colour = COLOURS[obj["colour"]]
        if obj["shape"] == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        else:
            draw.polygon(shape_points(obj["shape"], cx, cy, r), fill=colour)
    return img.resize((image_size, image_size), Image.Resampling.BOX)


def a(word: str) -> str:
    """`word` with its indefinite article ("an orange", "a red")."""
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def short_caption(scene: dict) -> str:
    """The poor caption of Supp. Fig. E: the primary object only."""
    obj = scene["objects"][0]
    return f"{a(obj['colour'])} {obj['shape']}."


def write_split(out: Path, split: str, n: int, data: DataConfig, seed: int) -> None:
    rng = random.Random(f"world-{seed}-{split}")  # str seeds hash with sha512: stable across runs
    rows = []
    for i in tqdm(range(n), desc=f"world {split}", unit="img"):
        scene = sample_scene(rng, data.max_shapes)
        image_id = f"{split}_{i:06d}"
        save_png(render(scene, data.image_size), out / split / "images" / f"{image_id}.png")
        primary = scene["objects"][0]
        rows.append({"id": image_id, "image": f"{out.name}/{split}/images/{image_id}.png",
                     "scene": scene, "labels": {"shape": primary["shape"],
                                                "colour": primary["colour"]},
                     "short_caption": short_caption(scene)})
    atomic_write_jsonl(out / split / "scenes.jsonl", rows)


# --- facts --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Fact:
    """A fact in several phrasings plus the multiple-choice question that tests it."""

    subject: str
    phrasings: tuple[str, ...]
    question: str
    answer: str
    distractors: tuple[str, ...]  # wrong options to draw three from


NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
                "seventeen", "eighteen", "nineteen", "twenty")
SYLLABLES = ("ka", "lo", "mi", "ren", "to", "va", "sel", "dor", "ni", "bra", "quo", "zen",
             "fa", "mur", "el", "tis", "gor", "ua", "pel", "shi")


def fictional_name(rng: random.Random, used: set[str]) -> str:
    while True:
        name = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()
        if name not in used:
            used.add(name)
            return name


def geography_facts(rng: random.Random, n_countries: int = 30) -> list[Fact]:
    """A seeded fictional geography, so the tiny LM can only know it from the corpus."""
    used: set[str] = set()
    pairs = [(fictional_name(rng, used), fictional_name(rng, used)) for _ in range(n_countries)]
    countries, capitals = [c for c, _ in pairs], [k for _, k in pairs]
    facts = []
    for country, capital in pairs:
        phrasings = (f"the capital of {country} is {capital}.",
                     f"{capital} is the capital of {country}.",
                     f"{capital} is the capital city of the country {country}.")
        facts.append(Fact("geography", phrasings, f"What is the capital of {country}?", capital,
                          tuple(c for c in capitals if c != capital)))
        facts.append(Fact("geography", phrasings, f"{capital} is the capital of which country?",
                          country, tuple(c for c in countries if c != country)))
    return facts


OBJECT_COLOURS = {
    "the sky": "blue", "grass": "green", "a banana": "yellow", "snow": "white", "coal": "black",
    "a tomato": "red", "a strawberry": "red", "a lemon": "yellow", "a carrot": "orange",
    "a pumpkin": "orange", "a leaf": "green", "the sea": "blue", "milk": "white",
    "a crow": "black", "a plum": "purple", "a grape": "purple", "a violet": "purple",
    "chocolate": "brown", "soil": "brown", "an elephant": "grey", "ash": "grey", "a pig": "pink",
    "a flamingo": "pink", "a cloud": "white", "ink": "black", "a frog": "green",
    "a lime": "green", "a cherry": "red", "a blueberry": "blue", "the sun": "yellow",
    "a mouse": "grey", "a tangerine": "orange", "corn": "yellow", "a ruby": "red",
    "an emerald": "green", "a sapphire": "blue", "a lavender flower": "purple",
    "tree bark": "brown", "a salmon steak": "pink",
}
COLOUR_MIXES = {("red", "yellow"): "orange", ("blue", "yellow"): "green",
                ("red", "blue"): "purple", ("red", "white"): "pink", ("black", "white"): "grey",
                ("blue", "white"): "light blue"}
ALL_COLOURS = tuple(sorted(set(OBJECT_COLOURS.values()) | set(COLOUR_MIXES.values())))


def colour_facts(rng: random.Random) -> list[Fact]:
    facts = []
    for thing, colour in OBJECT_COLOURS.items():
        facts.append(Fact("colours", (f"{thing} is {colour}.",
                                      f"the colour of {thing} is {colour}.",
                                      f"{colour} is the colour of {thing}."),
                          f"What colour is {thing}?", colour,
                          tuple(c for c in ALL_COLOURS if c != colour)))
    for (first, second), mix in COLOUR_MIXES.items():
        facts.append(Fact("colours", (f"mixing {first} and {second} makes {mix}.",
                                      f"{first} mixed with {second} gives {mix}."),
                          f"What colour do you get by mixing {first} and {second}?", mix,
                          tuple(c for c in ALL_COLOURS if c != mix)))
    for name in COLOURS:  # the world's own colours
        facts.append(Fact("colours", (f"{name} is a colour.", f"one colour is {name}."),
                          "Which of these is a colour?", name,
                          tuple(s for s in SHAPES + ("large", "small", "left", "above"))))
    return facts


POLYGON_SIDES = {"triangle": 3, "square": 4, "pentagon": 5, "hexagon": 6, "heptagon": 7,
                 "octagon": 8, "nonagon": 9, "decagon": 10}
SOLID_FACES = {"tetrahedron": 4, "cube": 6, "octahedron": 8, "dodecahedron": 12,
               "icosahedron": 20}


def shape_facts(rng: random.Random) -> list[Fact]:
    facts = []
    for shape, n in POLYGON_SIDES.items():
        w = NUMBER_WORDS[n]
        facts.append(Fact("shapes", (f"{a(shape)} has {w} sides.",
                                     f"the number of sides of {a(shape)} is {w}."),
                          f"How many sides does {a(shape)} have?", w,
                          tuple(x for x in NUMBER_WORDS[2:13] if x != w)))
        facts.append(Fact("shapes", (f"{a(shape)} has {w} corners.",
                                     f"the number of corners of {a(shape)} is {w}."),
                          f"How many corners does {a(shape)} have?", w,
                          tuple(x for x in NUMBER_WORDS[2:13] if x != w)))
        facts.append(Fact("shapes", (f"a shape with {w} sides is {a(shape)}.",),
                          f"Which shape has {w} sides?", shape,
                          tuple(s for s in POLYGON_SIDES if s != shape)))
    for solid, n in SOLID_FACES.items():
        w = NUMBER_WORDS[n]
        facts.append(Fact("shapes", (f"{a(solid)} has {w} faces.",
                                     f"the number of faces of {a(solid)} is {w}."),
                          f"How many faces does {a(solid)} have?", w,
                          tuple(x for x in NUMBER_WORDS[3:21] if x != w)))
    facts.append(Fact("shapes", ("a circle is round.", "a circle has no corners."),
                      "Which shape is round?", "circle", ("square", "triangle", "diamond", "cross",
                                                          "pentagon", "hexagon")))
    facts.append(Fact("shapes", ("a diamond is a square turned on its corner.",),
                      "Which shape is a square turned on its corner?", "diamond",
                      ("circle", "triangle", "cross", "hexagon", "pentagon")))
    facts.append(Fact("shapes", ("a cross is made of two bars that meet in the middle.",),
                      "Which shape is made of two bars that meet in the middle?", "cross",
                      ("circle", "triangle", "diamond", "square", "hexagon")))
    return facts


def arithmetic_facts(rng: random.Random, n_facts: int = 60) -> list[Fact]:
    """Sums and differences of small numbers; numbers as words so each is one short token run."""
    pool = [(a, "plus", b, a + b) for a in range(1, 10) for b in range(1, 10) if a + b <= 20]
    pool += [(a, "minus", b, a - b) for a in range(2, 11) for b in range(1, a)]
    facts = []
    for a, op, b, c in rng.sample(pool, n_facts):
        wa, wb, wc = NUMBER_WORDS[a], NUMBER_WORDS[b], NUMBER_WORDS[c]
        facts.append(Fact("arithmetic", (f"{wa} {op} {wb} is {wc}.", f"{wa} {op} {wb} equals {wc}.",
                                         f"{wc} is {wa} {op} {wb}."),
                          f"What is {wa} {op} {wb}?", wc,
                          tuple(w for w in NUMBER_WORDS if w != wc)))
    return facts


# Subject -> fact generator; each takes the subject's seeded rng (used where facts are sampled).
SUBJECTS = {"geography": geography_facts, "colours": colour_facts, "shapes": shape_facts,
            "arithmetic": arithmetic_facts}


def world_facts() -> list[str]:
    """What the words of the captions mean, so the tiny LM has seen them before any image."""
    lines = [f"{s} is a shape." for s in SHAPES] + [f"{c} is a colour." for c in COLOURS]
    lines += [f"{z} is a size." for z in SIZES] + [f"{p} is a position." for p in POSITIONS]
    lines += [f"{a(c)} {s} is {a(s)} that is {c}." for s in SHAPES for c in COLOURS]
    return lines


# --- multiple choice ----------------------------------------------------------------------------

def mc_options(fact: Fact, rng: random.Random, letter: int) -> list[str]:
    """Four options with the answer at index `letter` and three distinct distractors."""
    wrong = rng.sample(sorted(set(fact.distractors) - {fact.answer}), 3)
    return wrong[:letter] + [fact.answer] + wrong[letter:]


def benchmark_items(facts: list[Fact], sizes: tuple[int, ...],
                    rng: random.Random) -> list[list[tuple[Fact, list[str]]]]:
    """Splits of `sizes` items over consecutive facts (cycling when there are too few); in each
    split the gold letters are balanced over A-D, then shuffled."""
    splits, start = [], 0
    for n in sizes:
        letters = [i % 4 for i in range(n)]
        rng.shuffle(letters)
        chosen = [facts[(start + i) % len(facts)] for i in range(n)]
        splits.append([(f, mc_options(f, rng, k)) for f, k in zip(chosen, letters)])
        start += n
    return splits


def practice_items(facts: list[Fact], per_fact: int, taken: set[tuple[str, tuple[str, ...]]],
                   rng: random.Random) -> list[str]:
    """Items over the benchmark's facts whose options differ from every dev/test item."""
    items = []
    for fact in facts:
        for _ in range(per_fact):
            for _attempt in range(100):
                options = mc_options(fact, rng, rng.randrange(4))
                if (fact.question, tuple(options)) not in taken:
                    break
            else:
                raise RuntimeError(f"no fresh option set for {fact.question!r}: add distractors")
            items.append(format_example(Item(fact.question, tuple(options),
                                             LETTERS[options.index(fact.answer)])))
    return items


def csv_text(items: list[tuple[Fact, list[str]]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    for fact, options in items:
        writer.writerow([fact.question, *options, LETTERS[options.index(fact.answer)]])
    return buf.getvalue()


def scene_record(scene: dict) -> str:
    """The scene as a compact record, "Objects: large red cross left; small blue circle top."."""
    return "Objects: " + "; ".join(f"{o['size']} {o['colour']} {o['shape']} {o['position']}"
                                   for o in scene["objects"]) + "."


def scene_descriptions(data: DataConfig, seed: int) -> list[str]:
    """`data.n_corpus_descriptions` captions of random scenes that no image shows, each after the
    scene's compact record: the language of descriptions for the tiny LLM, as English is Llama's,
    and the habit of describing what the context shows. With a frozen text tower the vision tower
    can only steer what the LLM already does: without descriptions the tiny LLM knows facts and
    quiz items only; with descriptions alone it writes fluent captions of random scenes and reads
    nothing of its context (measured: the same caption given just before changes its loss by
    0.3 %), so no image can ground them. After a record, the attributes are predictable from the
    context only: the LLM learns to copy them, and the vision tower learns to be read as such a
    record."""
    rng = random.Random(f"descriptions-{seed}")
    out = []
    for k in range(data.n_corpus_descriptions):
        scene = sample_scene(rng, data.max_shapes)
        out.append(scene_record(scene) + " " + scene_caption(f"description-{seed}-{k}", scene))
    return out


def write_text_data(out: Path, data: DataConfig, seed: int) -> None:
    """corpus.txt and mmlu/{dev,test}/*.csv from the same facts."""
    all_facts: list[Fact] = []
    blocks: list[str] = []
    for subject in data.mmlu_subjects:
        if subject not in SUBJECTS:
            raise ConfigError(f"config.data.mmlu_subjects: no fact generator for {subject!r} "
                              f"(known: {', '.join(SUBJECTS)})")
        rng = random.Random(f"facts-{seed}-{subject}")
        facts = SUBJECTS[subject](rng)
        rng.shuffle(facts)
        dev, test = benchmark_items(
            facts, (data.mmlu_dev_per_subject, data.mmlu_test_per_subject), rng)
        items = dev + test
        atomic_write_text(out / "mmlu" / "dev" / f"{subject}_dev.csv", csv_text(dev))
        atomic_write_text(out / "mmlu" / "test" / f"{subject}_test.csv", csv_text(test))
        taken = {(f.question, tuple(o)) for f, o in items}
        asked = list(dict.fromkeys(f for f, _ in items))  # facts the benchmark asks, in order
        practice = practice_items(asked, data.mmlu_practice_per_question, taken, rng)
        rng.shuffle(practice)
        # Few-shot-shaped blocks of up to 3 items: the harness's prompt at a length that fits
        # the tiny LM's pretraining context.
        blocks += [description(subject) + FEWSHOT_DELIMITER.join(practice[i:i + 3])
                   for i in range(0, len(practice), 3)]
        all_facts += facts
    rng = random.Random(f"corpus-{seed}")
    # Every fact once in its first phrasing, then all phrasings in reshuffled passes.
    lines = list(dict.fromkeys([f.phrasings[0] for f in all_facts] + world_facts()))
    if data.n_corpus_facts < len(lines):
        raise ConfigError(f"config.data.n_corpus_facts = {data.n_corpus_facts}: the world has "
                          f"{len(lines)} facts; set it to at least that")
    pool = list(dict.fromkeys([p for f in all_facts for p in f.phrasings] + world_facts()))
    while len(lines) < data.n_corpus_facts:
        rng.shuffle(pool)
        lines += pool[:data.n_corpus_facts - len(lines)]
    # Interleave practice blocks among the fact lines, each block a paragraph of its own.
    entries: list[str] = lines + blocks + scene_descriptions(data, seed)
    rng.shuffle(entries)
    text = ""
    for entry in entries:
        if "\n" in entry:  # a practice block: a paragraph with blank lines around it
            text += ("" if not text or text.endswith("\n\n") else "\n") + entry + "\n\n"
        else:
            text += entry + "\n"
    atomic_write_text(out / "corpus.txt", text)


def generate_world(out: Path, data: DataConfig, seed: int) -> None:
    """Everything under `out` (R/world): corpus, tiny MMLU, the image splits (train, heldout,
    and align when `data.n_align` > 0: the alignment encoder's own images, see DataConfig)."""
    write_text_data(out, data, seed)
    for split, n in (("train", data.n_train), ("heldout", data.n_heldout), ("align", data.n_align)):
        if n:
            write_split(out, split, n, data, seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="config/tiny.yaml")
    parser.add_argument("--out", required=True, type=Path, help="R/world")
    args = parser.parse_args()
    cfg = load_run(args.config)
    generate_world(args.out, cfg.data, cfg.seed)
    print(f"wrote the tiny world to {args.out}")


if __name__ == "__main__":
    main()
