import csv
import re
from pathlib import Path

import pytest
from PIL import Image

from xfusion.caption import OPENINGS
from xfusion.config import ConfigError, load_run
from xfusion.data.world import COLOURS, LETTERS, generate_world
from xfusion.io import read_jsonl
from xfusion.mmlu import description

SMALL = {"data.n_train": 12, "data.n_heldout": 4, "data.n_corpus_facts": 300,
         "data.n_corpus_descriptions": 50}
# A scene description starts with one of the captioner's openings (up to its first placeholder).
RECORD = re.compile(r"^Objects: (.+?)\. (.+)$")  # a description line: record, then caption
STOP = {"what", "is", "the", "of", "a", "an", "how", "many", "does", "have", "which", "do", "you",
        "get", "by", "colour", "these", "shape", "has", "and", "country"}


def make_world(tiny_config, tmp_path: Path, name: str, **overrides) -> tuple[Path, object]:
    cfg = load_run(tiny_config({**SMALL, **overrides}, name=f"{name}.yaml"))
    out = tmp_path / name / "world"
    generate_world(out, cfg.data, cfg.seed)
    return out, cfg


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def split_corpus(text: str) -> tuple[list[str], list[tuple[str, tuple[str, ...], str]]]:
    """(fact lines, practice items as (question, options, gold letter))."""
    lines = text.split("\n")
    facts, items, i = [], [], 0
    while i < len(lines):
        line = lines[i]
        if i + 1 < len(lines) and lines[i + 1].startswith("A. "):
            options = tuple(lines[i + 1 + k][3:] for k in range(4))
            assert [lines[i + 1 + k][:3] for k in range(4)] == ["A. ", "B. ", "C. ", "D. "]
            answer = re.fullmatch(r"Answer: ([ABCD])", lines[i + 5])
            assert answer, f"item at line {i} lacks 'Answer: X': {lines[i + 5]!r}"
            items.append((line, options, answer.group(1)))
            i += 6
            continue
        if (line and not line.startswith("The following are multiple choice questions")
                and not RECORD.match(line)):
            facts.append(line)
        i += 1
    return facts, items


def read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="") as fh:
        return list(csv.reader(fh))


def test_same_seed_gives_identical_bytes(tiny_config, tmp_path):
    a, _ = make_world(tiny_config, tmp_path, "a")
    b, _ = make_world(tiny_config, tmp_path, "b")
    assert tree_bytes(a) == tree_bytes(b)


def test_different_seed_changes_images_corpus_and_mmlu(tiny_config, tmp_path):
    a, _ = make_world(tiny_config, tmp_path, "a")
    b, _ = make_world(tiny_config, tmp_path, "b", seed=1)
    ta, tb = tree_bytes(a), tree_bytes(b)
    assert ta.keys() == tb.keys()
    for name in ("corpus.txt", "train/images/train_000000.png", "mmlu/test/geography_test.csv"):
        assert ta[name] != tb[name], name


def test_counts_layout_and_labels_match_config(tiny_config, tmp_path):
    out, cfg = make_world(tiny_config, tmp_path, "w")
    for split, n in (("train", cfg.data.n_train), ("heldout", cfg.data.n_heldout)):
        rows = read_jsonl(out / split / "scenes.jsonl")
        assert len(rows) == n == len(list((out / split / "images").glob("*.png")))
        for row in rows:
            assert set(row) == {"id", "image", "scene", "labels", "short_caption"}
            img = Image.open(out.parent / row["image"])
            assert img.mode == "RGB" and img.size == (cfg.data.image_size,) * 2
            objects = row["scene"]["objects"]
            assert 1 <= len(objects) <= cfg.data.max_shapes
            primary = objects[0]
            assert primary["size"] == "large"
            assert row["labels"] == {"shape": primary["shape"], "colour": primary["colour"]}
            assert row["short_caption"].endswith(f"{primary['colour']} {primary['shape']}.")
            assert len(row["scene"]["relations"]) == len(objects) * (len(objects) - 1) // 2


def test_images_show_the_primary_colour(tiny_config, tmp_path):
    out, _ = make_world(tiny_config, tmp_path, "w")
    for row in read_jsonl(out / "train" / "scenes.jsonl")[:6]:
        img = Image.open(out.parent / row["image"])
        target = COLOURS[row["labels"]["colour"]]
        assert any(max(abs(p - t) for p, t in zip(px, target)) < 8 for px in img.getdata())


def test_corpus_has_configured_fact_lines_and_harness_format_practice(tiny_config, tmp_path):
    out, cfg = make_world(tiny_config, tmp_path, "w")
    text = (out / "corpus.txt").read_text()
    facts, items = split_corpus(text)
    assert len(facts) == cfg.data.n_corpus_facts
    n_questions = cfg.data.mmlu_dev_per_subject + cfg.data.mmlu_test_per_subject
    assert len(items) >= len(cfg.data.mmlu_subjects) * n_questions  # >= 1 per question
    assert description("shapes") in text
    for question, options, letter in items:
        assert len(set(options)) == 4 and letter in LETTERS


def test_corpus_describes_scenes_in_the_captions_language(tiny_config, tmp_path):
    out, cfg = make_world(tiny_config, tmp_path, "w")
    lines = (out / "corpus.txt").read_text().split("\n")
    described = [m for m in map(RECORD.match, lines) if m]
    assert len(described) == cfg.data.n_corpus_descriptions
    descriptions = [m.group(2) for m in described]
    assert all(d.startswith(tuple(o.split("{")[0] for o in OPENINGS)) for d in descriptions)
    captions = {row["caption"] for row in read_jsonl(out / "train" / "scenes.jsonl")
                if "caption" in row}
    # Scenes of their own: the descriptions teach the phrasing, not the training pairs.
    assert not captions & set(descriptions)
    words = set(" ".join(descriptions).replace(".", " ").replace(",", " ").split())
    assert {"large", "left", "right", "background"} <= words
    assert set(COLOURS) <= words


def test_each_description_follows_the_record_of_its_own_scene(tiny_config, tmp_path):
    """The record before a description names exactly the objects the description names, so the
    tiny LLM learns to describe what its context shows (the habit a frozen tower relies on)."""
    out, _ = make_world(tiny_config, tmp_path, "w")
    for line in (out / "corpus.txt").read_text().split("\n"):
        m = RECORD.match(line)
        if not m:
            continue
        for obj in m.group(1).split("; "):
            size, colour, shape, position = obj.split()
            assert colour in COLOURS
            assert f"{colour} {shape}" in m.group(2) or f"{colour} {shape}" in m.group(2).replace(
                f"{shape}, {size} in size", shape), line
            assert f"{position}" in m.group(2) and size in m.group(2), line


def test_mmlu_csv_layout_balanced_answers_and_gold_fact_in_corpus(tiny_config, tmp_path):
    out, cfg = make_world(tiny_config, tmp_path, "w")
    facts, items = split_corpus((out / "corpus.txt").read_text())
    fact_words = [set(re.findall(r"[\w]+", f.lower())) for f in facts]
    practice = {(q, o) for q, o, _ in items}
    for subject in cfg.data.mmlu_subjects:
        dev = read_csv(out / "mmlu" / "dev" / f"{subject}_dev.csv")
        test = read_csv(out / "mmlu" / "test" / f"{subject}_test.csv")
        assert len(dev) == cfg.data.mmlu_dev_per_subject == 5
        assert len(test) == cfg.data.mmlu_test_per_subject
        counts = {x: sum(r[5] == x for r in test) for x in LETTERS}
        assert max(counts.values()) - min(counts.values()) <= 1, counts
        for row in dev + test:
            assert len(row) == 6 and row[5] in LETTERS and len(set(row[1:5])) == 4
            question, gold = row[0], row[1 + LETTERS.index(row[5])]
            keys = set(re.findall(r"\w+", question.lower())) - STOP
            need = keys | set(gold.lower().split())
            assert any(need <= words for words in fact_words), (question, gold)
            assert (question, tuple(row[1:5])) not in practice  # practice never copies an item


def test_unknown_subject_is_a_config_error(tiny_config, tmp_path):
    with pytest.raises(ConfigError, match="history"):
        make_world(tiny_config, tmp_path, "w", **{"data.mmlu_subjects": ["history"]})
