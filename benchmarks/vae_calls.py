"""Image-encoder calls during training: the dataset is encoded once, training reads stored latents.

Builds a tiny world in a temporary directory with the data stage's own code (world images,
scene captions, BPE tokenizer, latents through `xfusion.latents.encode_images`, a random 2-layer
base Llama), then runs a few steps of `xfusion.train.train` (the real path: MixedStream, the
DeepSpeed engine, checkpoints, an eval-step model dir) with every image encoder instrumented:
`xfusion.codec.ImageCodec.encode` (every codec kind inherits it) and, when diffusers is
installed, `diffusers.AutoencoderKL.encode`. The encoding of the latents before training is
counted too, as a check that the instrumentation sees real calls.

`python -m benchmarks.vae_calls` prints `count vae_encoder_calls_in_training <n>` (DESIGN:
"Encode the dataset with the VAE once; every run trains on stored latents": n must be 0).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import tempfile
from pathlib import Path

import torch
import yaml

from benchmarks.common import emit, note
from xfusion.config import apply_overrides, load_run, load_yaml

REPO = Path(__file__).resolve().parents[1]
STEPS = 3
OVERRIDES = {
    "data.n_train": 16,
    "data.max_caption_tokens": 24,
    "model.base_lm.tiny": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                           "num_key_value_heads": 2, "intermediate_size": 64,
                           "max_position_embeddings": 128},
    "training.steps": STEPS,
    "training.tokens_per_batch": 4 * (16 + 24 + 4),
    "training.warmup_steps": 1,
    "training.checkpoint_every": 2,
    "training.eval_steps": [STEPS],
    "training.log_every": 1,
}


class EncoderCalls:
    """Counts calls of every image encoder while active (`with calls: ...`)."""

    def __init__(self):
        self.n = 0
        self._patches: list[tuple[type, object]] = []

    def _wrap(self, cls: type) -> None:
        original = cls.encode

        @functools.wraps(original)
        def counted(codec, *args, **kwargs):
            self.n += 1
            return original(codec, *args, **kwargs)

        self._patches.append((cls, original))
        cls.encode = counted

    def __enter__(self) -> "EncoderCalls":
        from xfusion.codec import ImageCodec

        self._wrap(ImageCodec)
        with contextlib.suppress(ImportError):
            from diffusers import AutoencoderKL

            self._wrap(AutoencoderKL)
        return self

    def __exit__(self, *exc) -> None:
        for cls, original in reversed(self._patches):
            cls.encode = original
        self._patches.clear()


def build_world(root: Path) -> dict:
    """Config, latents, captions and base LM of a tiny world under `root` (as tests/test_train)."""
    from xfusion.caption import caption_file
    from xfusion.codec import build_codec
    from xfusion.data import resolve_image
    from xfusion.data.world import write_split
    from xfusion.io import read_jsonl
    from xfusion.latents import encode_images, save_latents
    from xfusion.model.base import build_tiny_llama, text_weight_hash
    from xfusion.tokenizer import load_tokenizer, train_bpe

    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(
        apply_overrides(load_yaml(REPO / "config" / "tiny.yaml"), OVERRIDES), sort_keys=False))
    cfg = load_run(config, "dual_tower")
    R = root / "results"
    write_split(R / "world", "train", cfg.data.n_train, cfg.data, cfg.seed)
    captions = R / "captions" / "train.jsonl"
    caption_file(R / "world" / "train" / "scenes.jsonl", captions, cfg.data.captioner, "stop")
    rows = read_jsonl(captions)
    train_bpe([r["caption"] for r in rows], vocab_size=300).save_pretrained(R / "tokenizer")
    tok = load_tokenizer(R / "tokenizer")
    latents = encode_images([resolve_image(r["image"], captions) for r in rows],
                            build_codec(cfg.model.codec), cfg.data.image_size,
                            cfg.data.encode_batch_size, torch.device("cpu"))
    save_latents(R / "latents" / "train.safetensors", latents, [r["id"] for r in rows], {})
    torch.manual_seed(0)
    llm = build_tiny_llama(cfg.model.base_lm.tiny, len(tok), tok.bos_token_id, tok.eos_token_id,
                           tok.pad_token_id)
    base = R / "base_lm" / "tiny_base"
    llm.save_pretrained(base / "hf")
    tok.save_pretrained(base / "hf")
    (base / "base_model.json").write_text(json.dumps(
        {"path": "hf", "tokenizer": "hf", "text_weight_hash": text_weight_hash(llm)}))
    return {"config": config, "base_lm": base / "base_model.json",
            "latents": R / "latents" / "train.safetensors", "captions": captions,
            "out": R / "runs" / "dual_tower"}


def main() -> None:
    from xfusion import train

    os.environ.pop("MLFLOW_TRACKING_URI", None)  # the run's local file store, in the temp dir
    with tempfile.TemporaryDirectory(prefix="vae_calls_") as tmp:
        with EncoderCalls() as data_calls:
            world = build_world(Path(tmp))
        with EncoderCalls() as calls:
            done = train.train(train.parse_args([
                "--config", str(world["config"]), "--run", "dual_tower",
                "--base-lm", str(world["base_lm"]), "--latents", str(world["latents"]),
                "--captions", str(world["captions"]), "--out", str(world["out"])]))
        trained = (world["out"] / "steps" / str(STEPS) / "trainable.safetensors").is_file()
    if done.get("steps") != STEPS or not trained:
        raise SystemExit(f"benchmarks.vae_calls: training did not finish its {STEPS} steps")
    emit("count", "vae_encoder_calls_in_training", calls.n, digits=0)
    note(f"vae_calls: {STEPS} steps of xfusion.train (dual_tower, tiny world of "
         f"{OVERRIDES['data.n_train']} images); the same instrumentation counted {data_calls.n} "
         "encoder call(s) while the data stage encoded the latents")


if __name__ == "__main__":
    main()
