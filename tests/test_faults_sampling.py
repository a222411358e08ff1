"""Sampling survives SIGKILL: `python -m xfusion.sample` killed part-way, then rerun, gives the
outputs of an uninterrupted run, and never takes a partial file for a complete one.

The kills are deterministic: the sampler runs under `python -c` with one library call wrapped to
SIGKILL the process at a chosen point (T2I: in the middle of writing the third PNG, after two
are complete; I2T: after two batches of captions), which is what an external `kill -9` at that
moment does. Tiny model: a random 2-layer Llama (hidden 32) with moved-off-init trainable
weights, 3x8x8 latents, saved with XFusionModel.save and loaded by the CLI from its directory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from xfusion import sample

REPO = Path(__file__).resolve().parents[1]
N = 6  # samples; batch size 1, so one PNG / caption batch at a time
TIMEOUT_S = 150

# T2I: inside the 3rd PNG write, put 40 bytes where the bytes were going (the temp file), then die.
KILL_IN_THIRD_PNG = """
import os, pathlib, signal
from xfusion import sample
real, calls = pathlib.Path.write_bytes, [0]
def write_bytes(self, data):
    calls[0] += 1
    if calls[0] == 3:  # the third PNG: write a truncated file where it is being written, die
        real(self, data[:40])
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, data)
pathlib.Path.write_bytes = write_bytes
sample.main()
"""
# I2T: die when the 3rd batch of captions is asked for.
KILL_AT_THIRD_CAPTION_BATCH = """
import os, signal
from xfusion import sample
real, calls = sample.generate_captions, [0]
def generate(*args, **kwargs):
    calls[0] += 1
    if calls[0] == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
sample.generate_captions = generate
sample.main()
"""


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory) -> dict:
    """A saved model dir on a saved base LLM + tokenizer, prompts and latents."""
    from xfusion.config import TinyLlamaConfig, apply_overrides, load_yaml, run_from_dict
    from xfusion.latents import save_latents
    from xfusion.model import XFusionModel
    from xfusion.model.base import build_tiny_llama, load_base_llm, text_weight_hash
    from xfusion.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("faults_sampling")
    captions = ["a red square", "two blue circles", "a green triangle", "one small red circle",
                "a big blue square", "three green triangles"]
    tok = train_bpe(captions * 10, 300)
    torch.manual_seed(0)
    llm = build_tiny_llama(TinyLlamaConfig(hidden_size=32, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2,
                                           intermediate_size=64), len(tok), tok.bos_token_id,
                           tok.eos_token_id, tok.pad_token_id)
    base = root / "base_lm"
    llm.save_pretrained(base / "hf")
    tok.save_pretrained(base / "hf")
    (base / "base_model.json").write_text(json.dumps(
        {"path": "hf", "tokenizer": "hf", "text_weight_hash": text_weight_hash(llm)}))
    raw = apply_overrides(load_yaml(REPO / "config" / "tiny.yaml"), {
        "model.codec.latent_channels": 3, "model.codec.downsample": 1, "data.image_size": 8,
        "evaluation.n_samples": N, "evaluation.sample_batch_size": 1,
        "evaluation.sample_steps": 3, "evaluation.caption_max_tokens": 6,
        "evaluation.top_p": 0.9})  # nucleus: the caption RNG stream must survive a rerun too
    model = XFusionModel.from_base(run_from_dict(raw), *load_base_llm(base / "base_model.json"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # off the init (zero unpatchify), so images and captions vary
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    model.save(root / "model")
    prompts = root / "captions.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"im{i}", "image": f"/x/im{i}.png",
                                           "caption": c}) + "\n" for i, c in enumerate(captions)))
    save_latents(root / "latents.safetensors", torch.randn(N, 3, 8, 8, generator=g),
                 [f"im{i}" for i in range(N)], {})
    return {"root": root, "model": root / "model", "prompts": prompts,
            "latents": root / "latents.safetensors"}


def _t2i_args(fx: dict, out: Path) -> list[str]:
    return ["--model", str(fx["model"]), "--mode", "t2i", "--prompts", str(fx["prompts"]),
            "--out", str(out), "--device", "cpu"]


def _i2t_args(fx: dict, out: Path) -> list[str]:
    return ["--model", str(fx["model"]), "--mode", "i2t", "--latents", str(fx["latents"]),
            "--captions", str(fx["prompts"]), "--out", str(out), "--device", "cpu"]


def _start_killed(script: str, args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", script, *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_killed(proc: subprocess.Popen) -> None:
    try:
        _, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"the sampler was not killed within {TIMEOUT_S} s")
    assert proc.returncode == -signal.SIGKILL, err[-2000:]


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@pytest.fixture(scope="module")
def runs(fixture_dir, tmp_path_factory) -> dict:
    """Both killed samplers start at once (their start-up overlaps the uninterrupted reference
    runs, made in this process meanwhile); the state each kill left is recorded, then both are
    rerun with the plain CLI entry point."""
    fx, root = fixture_dir, tmp_path_factory.mktemp("runs")
    t2i, i2t = root / "t2i", root / "i2t.jsonl"
    procs = [_start_killed(KILL_IN_THIRD_PNG, _t2i_args(fx, t2i)),
             _start_killed(KILL_AT_THIRD_CAPTION_BATCH, _i2t_args(fx, i2t))]
    sample.main(_t2i_args(fx, root / "t2i_reference"))
    sample.main(_i2t_args(fx, root / "i2t_reference.jsonl"))
    for proc in procs:
        _wait_killed(proc)
    after_kill = {"t2i_files": sorted(p.name for p in t2i.iterdir()),
                  "t2i_pixels": {p.name: _pixels(p) for p in t2i.glob("[0-9]*.png")},
                  "i2t_exists": i2t.exists()}
    sample.main(_t2i_args(fx, t2i))
    sample.main(_i2t_args(fx, i2t))
    return {"root": root, "t2i": t2i, "i2t": i2t, "after_kill": after_kill}


def test_t2i_killed_mid_png_then_rerun_equals_an_uninterrupted_run(runs):
    reference, out, after = runs["root"] / "t2i_reference", runs["t2i"], runs["after_kill"]
    expected = [f"{i}.png" for i in range(N)]
    # The kill hit the third PNG mid-write: its bytes went to a temp file, never to 2.png, and
    # what was there under a final name was complete. No index.jsonl (the completion marker).
    assert sorted(after["t2i_pixels"]) == ["0.png", "1.png"]
    assert any(name.startswith(".2.png.") for name in after["t2i_files"])  # the temp file
    assert "index.jsonl" not in after["t2i_files"]
    for name, pixels in after["t2i_pixels"].items():
        assert np.array_equal(pixels, _pixels(reference / name)), name
    # The rerun resumed and ends equal to the uninterrupted run.
    assert (out / "index.jsonl").read_text() == (reference / "index.jsonl").read_text()
    assert sorted(p.name for p in out.glob("[0-9]*.png")) == sorted(expected)
    for name in expected:
        assert np.array_equal(_pixels(out / name), _pixels(reference / name)), name


def test_t2i_dir_after_kill_and_rerun_holds_only_the_indexed_images(runs):
    from eval.fid import image_files

    out = runs["t2i"]
    indexed = [json.loads(line)["file"] for line in (out / "index.jsonl").read_text().splitlines()]
    assert sorted(p.name for p in image_files(out)) == sorted(indexed)


def test_i2t_killed_mid_run_leaves_no_partial_file_and_rerun_equals_uninterrupted(runs):
    reference, out, after = runs["root"] / "i2t_reference.jsonl", runs["i2t"], runs["after_kill"]
    rows = [json.loads(line) for line in reference.read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"im{i}" for i in range(N)]
    # Captions are written once, atomically, at the end (I2T restarts rather than resumes):
    # two batches were done at the kill, yet no output file, partial or not, existed.
    assert not after["i2t_exists"]
    assert out.read_text() == reference.read_text()
