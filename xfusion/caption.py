"""Long captions for every image: the paper's InternVL re-captioning step (X-Fusion Sec. 4).

`python -m xfusion.caption --config C --scenes R/world/<split>/scenes.jsonl --out R/captions/<split>.jsonl`
writes `{"id", "image", "caption"}` per line, in the order of the scenes file.

Backends (`data.captioner.backend`):
  scene  tiny scale: long, detailed captions composed from the scene record (every object's colour,
         size, shape and position, and the relations). The phrasing varies between images but is
         chosen by a generator seeded with the image id, so one input always gives one caption.
  hf     any transformers image-text-to-text model (InternVL2 at paper scale, a local path or hub
         id in `data.captioner.model`), batched, greedy, given only the processor outputs its
         `generate` takes (`generate_input_names`), resumable: every `shard_size` images form a
         shard written atomically under `<out>.shards/`; a rerun skips the shards already there and
         the shards are merged into `<out>` in input order at the end.
Sharded (xfusion.shards): `--shard K --of N` captions only shard K's lines of the scenes file
into `--out R/captions/shards/<split>/<K>.jsonl`, one Snakemake job per shard (rule `caption`);
Snakemake reruns the shards without output, and `python -m xfusion.gather captions` joins them.
Bad inputs (xfusion.data, `data.bad_input_policy`): an undecodable or incomplete line of the
scenes file, a missing, corrupt or truncated image (hf backend), an empty caption from the
captioner. `skip` leaves them out of `<out>` and names each (file, line) in
`<out stem>.bad_inputs.json` beside it; `stop` exits naming the first. A shard keeps a marker
row for each bad image it left out, so a resumed run reports the same items.

References: X-Fusion (Mo et al., 2025) Sec. 4 and Supp. E (long vs short captions);
transformers' image-text-to-text pipeline (processor + generate).
"""

from __future__ import annotations

import argparse
import inspect
import random
import sys
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from xfusion.config import CaptionerConfig, load_run
from xfusion.data import BadInputs, caption_text, read_records, record_image, report_path
from xfusion.io import atomic_write_jsonl
from xfusion.shards import count_records, shard_lines

OPENINGS = ("The image shows {n} on a plain light grey background.",
            "This picture contains {n} drawn on a plain light grey background.",
            "On a plain light grey background there {are} {n}.",
            "A simple image with {n} on a light grey background.")
OBJECT_PHRASES = ("{A} {size} {colour} {shape} is at the {position}.",
                  "At the {position} there is {a} {size} {colour} {shape}.",
                  "{Ac} {colour} {shape}, {size} in size, sits at the {position}.",
                  "The {position} of the image holds {a} {size} {colour} {shape}.")
RELATION_PHRASES = ("The {s} is {relation} the {o}.", "The {o} is {inverse} the {s}.")
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
COUNT_WORDS = ("no shapes", "one shape", "two shapes", "three shapes", "four shapes",
               "five shapes")


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def relation_words(rel: str) -> str:
    return rel if rel in ("above", "below") else f"to the {rel}"


def scene_caption(image_id: str, scene: dict) -> str:
    """A long caption naming every object's colour, size, shape and position and each relation."""
    rng = random.Random(f"caption-{image_id}")
    objects = scene["objects"]
    n = len(objects)
    parts = [rng.choice(OPENINGS).format(n=COUNT_WORDS[n], are="is" if n == 1 else "are")]
    for obj in objects:
        a = article(obj["size"])  # {a}/{A} precede the size, {Ac} the colour
        parts.append(rng.choice(OBJECT_PHRASES).format(
            a=a, A=a.capitalize(), Ac=article(obj["colour"]).capitalize(), size=obj["size"],
            colour=obj["colour"], shape=obj["shape"],
            position=obj["position"]))
    for rel in scene["relations"]:
        s, o = objects[rel["subject"]], objects[rel["object"]]
        # Name objects by colour and shape: unique enough in a scene of at most a few shapes.
        s_name, o_name = f"{s['colour']} {s['shape']}", f"{o['colour']} {o['shape']}"
        parts.append(rng.choice(RELATION_PHRASES).format(
            s=s_name, o=o_name, relation=relation_words(rel["relation"]),
            inverse=relation_words(INVERSE[rel["relation"]])))
    return " ".join(parts)


def generate_input_names(model: torch.nn.Module) -> set[str]:
    """The inputs `model.generate` takes by name: the named parameters of the model's
    `prepare_inputs_for_generation` and `forward` (and its encoder's, for an encoder-decoder),
    those transformers' own check of generate's keyword arguments reads. A processor may return
    more (a BERT tokenizer's `token_type_ids`, which GIT's forward lacks and generate rejects)."""
    def named(fn) -> set[str]:
        return {n for n, p in inspect.signature(fn).parameters.items()
                if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}

    names = named(model.prepare_inputs_for_generation) | named(model.forward)
    encoder = getattr(model, "encoder", None)
    if model.config.is_encoder_decoder and encoder is not None:
        names |= named(encoder.forward)
    return names


class HFCaptioner:
    """Greedy captions from a transformers image-text-to-text model; of the processor's outputs
    only those the model's `generate` takes are passed (`generate_input_names`)."""

    def __init__(self, cfg: CaptionerConfig, device: str | None = None) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if not cfg.model:
            raise ValueError("config.data.captioner.model: the hf backend needs a local path or "
                             "hub id of an image-text-to-text model")
        self.cfg = cfg
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.processor = AutoProcessor.from_pretrained(cfg.model)
        # bf16 on GPU: a 26B captioner does not fit in fp32; the CPU (tests) keeps fp32
        dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        try:
            model = AutoModelForImageTextToText.from_pretrained(cfg.model, dtype=dtype)
        except ValueError:
            # checkpoints registered only as vision-to-sequence models (transformers < 5 has
            # that auto class; 5.x folded it into image-text-to-text and re-raises here)
            import transformers
            vision2seq = getattr(transformers, "AutoModelForVision2Seq", None)
            if vision2seq is None:
                raise
            model = vision2seq.from_pretrained(cfg.model, dtype=dtype)
        self.model = model.to(self.device).eval()
        self.input_names = generate_input_names(self.model)
        self._dropped: set[str] = set()
        tokenizer = getattr(self.processor, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.padding_side = "left"  # decoder-only generation continues after the prompt
        self.prompt = self._prompt(cfg.prompt)

    def _prompt(self, text: str) -> str:
        """Chat models get their chat template with an image slot; others the bare prompt."""
        if getattr(self.processor, "chat_template", None):
            messages = [{"role": "user", "content": [{"type": "image"},
                                                     {"type": "text", "text": text}]}]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True)
        return text

    @torch.no_grad()
    def __call__(self, images: list[Image.Image]) -> list[str]:
        inputs = self.processor(images=images, text=[self.prompt] * len(images),
                                return_tensors="pt", padding=True)
        inputs = inputs.to(self.device, dtype=self.model.dtype)  # casts floating tensors only
        if dropped := set(inputs) - self.input_names - self._dropped:
            print(f"captioner {self.cfg.model}: its generate takes no {sorted(dropped)} (a "
                  "processor output); not passed", file=sys.stderr)
            self._dropped |= dropped
        inputs = {k: v for k, v in inputs.items() if k in self.input_names}
        out = self.model.generate(**inputs, max_new_tokens=self.cfg.max_new_tokens,
                                  do_sample=False)  # (B, L_out)
        prompt_ids = inputs["input_ids"]  # (B, L_in)
        prompt_len = prompt_ids.shape[1]
        captions = []
        for row, prompt in zip(out, prompt_ids):
            if row.shape[0] >= prompt_len and torch.equal(row[:prompt_len], prompt):
                # decoder-only: the output repeats the prompt, keep what follows it
                text = self.processor.decode(row[prompt_len:], skip_special_tokens=True)
            else:
                # e.g. BLIP: the output restarts from the prompt text without the prompt's end
                # token; strip the prompt's text instead
                text = self.processor.decode(row, skip_special_tokens=True)
                prefix = self.processor.decode(prompt, skip_special_tokens=True).strip()
                if prefix and text.strip().startswith(prefix):
                    text = text.strip()[len(prefix):]
            captions.append(" ".join(text.split()))
        return captions


def caption_records(records: list[tuple[int, dict]], scenes_path: Path, captioner,
                    batch_size: int, bad: BadInputs, bar: tqdm) -> list[dict]:
    """Captions of `records` ((line, row) of the scenes file), `batch_size` images per call of
    `captioner()` (built on first use: a shard of bad images never loads the model). A row whose
    image does not decode is a bad input, kept as {"id", "image", "bad": {file, reason}}."""
    captioned: list[dict] = []
    for i in range(0, len(records), batch_size):
        batch, images = [], []
        for line, r in records[i:i + batch_size]:
            if (img := record_image(r, scenes_path, line, bad)) is None:
                captioned.append({"id": r["id"], "image": r["image"], "bad": bad.items[-1]})
                continue
            batch.append(r)
            images.append(img)
        captions = captioner()(images) if images else []
        captioned += [{"id": r["id"], "image": r["image"], "caption": c}
                      for r, c in zip(batch, captions)]
        bar.update(len(records[i:i + batch_size]))
    return captioned


def lazy_captioner(cfg: CaptionerConfig):
    """A function returning one HFCaptioner, loaded at its first call."""
    loaded: list[HFCaptioner] = []

    def get() -> HFCaptioner:
        if not loaded:
            loaded.append(HFCaptioner(cfg))
        return loaded[0]
    return get


def hf_captions(records: list[tuple[int, dict]], scenes_path: Path, out: Path,
                cfg: CaptionerConfig, bad: BadInputs) -> list[dict]:
    """Caption `records` ((line, row) of the scenes file) shard by shard, each shard written
    under `<out>.shards/`; shards already on disk are kept (resume after a kill). Bad images
    are left out (`caption_records`) and stay in their shard as markers."""
    shard_dir = out.with_name(out.name + ".shards")
    shards = [records[i:i + cfg.shard_size] for i in range(0, len(records), cfg.shard_size)]
    todo = [k for k in range(len(shards)) if not (shard_dir / f"{k:06d}.jsonl").exists()]
    captioner = lazy_captioner(cfg)
    with tqdm(total=sum(len(shards[k]) for k in todo), desc="caption", unit="img") as bar:
        for k in todo:
            captioned = caption_records(shards[k], scenes_path, captioner, cfg.batch_size, bad,
                                        bar)
            atomic_write_jsonl(shard_dir / f"{k:06d}.jsonl", captioned)
    rows = [row for k in range(len(shards)) for _, row in
            read_records(shard_dir / f"{k:06d}.jsonl", bad, keys=("id", "image"))]
    for row in rows:  # bad images of shards from an earlier run: report them in this one too
        if "bad" in row and row["bad"] not in bad.items:
            bad.add(**row["bad"])
    return [row for row in rows if "bad" not in row]


def shard_records(scenes_path: Path, cfg: CaptionerConfig, bad: BadInputs,
                  shard: tuple[int, int]) -> list[tuple[int, dict]]:
    """The records of shard k of n (xfusion.shards: lines k*shard_size+1 … of the scenes
    file); refuses a scenes file with more records than the n shards hold."""
    k, n = shard
    if not 0 <= k < n:
        raise SystemExit(f"--shard {k} --of {n}: the shard must be in [0, {n})")
    if (total := count_records(scenes_path)) > n * cfg.shard_size:
        raise SystemExit(f"{scenes_path}: {total} records, more than {n} shards of "
                         f"data.captioner.shard_size = {cfg.shard_size} hold; the shard plan "
                         "comes from data.n_train / data.n_heldout: rerun the data stage with "
                         "this config")
    return read_records(scenes_path, bad, keys=("id", "image"),
                        lines=shard_lines(k, cfg.shard_size))


def caption_file(scenes_path: Path, out: Path, cfg: CaptionerConfig, policy: str,
                 shard: tuple[int, int] | None = None) -> int:
    """Write `out` from `scenes_path` (only shard k of n of it with `shard` = (k, n): one job
    of the sharded data stage, xfusion.shards); returns the number of captions written."""
    bad = BadInputs(policy)
    if shard is None:
        records = read_records(scenes_path, bad, keys=("id", "image"))
    else:
        records = shard_records(scenes_path, cfg, bad, shard)
    line_of = {r["id"]: n for n, r in records}
    if cfg.backend == "scene":
        for _, r in records:
            if r.get("scene") is None:
                raise ValueError(f"{scenes_path}: record {r['id']} has no scene; the scene "
                                 "backend needs the tiny world (use data.captioner.backend: hf)")
        captioned = [{"id": r["id"], "image": r["image"],
                      "caption": scene_caption(r["id"], r["scene"])} for _, r in records]
    elif shard is None:
        captioned = hf_captions(records, scenes_path, out, cfg, bad)
    else:  # one job per shard: Snakemake reruns the shard whose output is missing
        with tqdm(total=len(records), desc="caption", unit="img") as bar:
            captioned = [row for row in caption_records(records, scenes_path, lazy_captioner(cfg),
                                                        cfg.batch_size, bad, bar)
                         if "bad" not in row]
    kept = []
    for row in captioned:
        if caption_text(row.get("caption")) is not None:
            kept.append(row)
        else:
            bad.add(row["image"], "empty caption: the captioner returned no text (named at "
                    f"{scenes_path}:{line_of[row['id']]})")
    atomic_write_jsonl(out, kept)
    bad.finish(report_path(out))
    return len(kept)


def main() -> None:
    parser = argparse.ArgumentParser(description="Long captions for a scenes file.")
    parser.add_argument("--config", required=True)
    parser.add_argument("--scenes", required=True, type=Path, help="R/world/<split>/scenes.jsonl")
    parser.add_argument("--shard", type=int, help="caption only shard K (xfusion.shards) ...")
    parser.add_argument("--of", type=int, help="... of N shards (the split's shard count)")
    parser.add_argument("--out", required=True, type=Path,
                        help="R/captions/<split>.jsonl, or with --shard "
                             "R/captions/shards/<split>/<K>.jsonl")
    args = parser.parse_args()
    if (args.shard is None) != (args.of is None):
        parser.error("--shard and --of go together")
    cfg = load_run(args.config)
    shard = None if args.shard is None else (args.shard, args.of)
    n = caption_file(args.scenes, args.out, cfg.data.captioner, cfg.data.bad_input_policy, shard)
    print(f"wrote {n} captions to {args.out}")


if __name__ == "__main__":
    main()
