"""The sharded data stage (xfusion.shards, xfusion.gather; rules caption, latents and their
gathers): the shard plan, one shard's captions and latents, the gather and its summed bad-input
report, the paper-scale plan, and a killed sharded run that reruns only its unfinished shards."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from bad_files import undecodable_line, write_corrupt, write_png
from test_workflow import SNAKEMAKE, job_counts, jobs, snakemake
from xfusion.caption import HFCaptioner, caption_file
from xfusion.config import CaptionerConfig, load_run
from xfusion.gather import gather_captions, gather_latents
from xfusion.io import read_jsonl
from xfusion.latents import encode_split, load_latents, save_latents
from xfusion.shards import n_shards, shard_lines, shard_name

ROOT = Path(__file__).resolve().parents[1]
SCENE = {"objects": [{"shape": "circle", "colour": "red", "size": "large", "position": "left"}],
         "relations": []}


def test_shards_cover_every_line_of_a_split_once():
    for n, size in ((1, 4), (4, 4), (5, 4), (2000, 1024), (1_000_000, 4096)):
        k = n_shards(n, size)
        lines = [line for i in range(k) for line in shard_lines(i, size)]
        assert lines[:n] == list(range(1, n + 1)) and len(lines) - n < size
    assert n_shards(1_000_000, 4096) == 245 and n_shards(30_000, 4096) == 8
    assert [shard_name(k) for k in (0, 7, 244)] == ["000000", "000007", "000244"]
    with pytest.raises(ValueError):
        n_shards(0, 4)


def write_world(root: Path, n: int, bad_line: int | None = None) -> Path:
    """n 32 px images under root/world/train and their scenes.jsonl; line `bad_line` (1-based)
    undecodable."""
    lines = []
    for i in range(n):
        write_png(root / "world" / "train" / "images" / f"im{i}.png", seed=i)
        row = {"id": f"im{i}", "image": f"world/train/images/im{i}.png", "scene": SCENE,
               "labels": None, "short_caption": "CAFE"}
        lines.append(undecodable_line(row) if i + 1 == bad_line
                     else json.dumps(row).encode() + b"\n")
    scenes = root / "world" / "train" / "scenes.jsonl"
    scenes.write_bytes(b"".join(lines))
    return scenes


def shard_out(root: Path, kind: str, k: int, ext: str) -> Path:
    return root / kind / "shards" / "train" / f"{shard_name(k)}.{ext}"


def report(path: Path) -> dict:
    return json.loads(path.with_name(path.stem + ".bad_inputs.json").read_text())


def test_a_caption_shard_holds_its_lines_and_reports_its_own_bad_inputs(tmp_path):
    scenes = write_world(tmp_path, 7, bad_line=4)  # shard 1 of size 3: lines 4-6
    cfg = CaptionerConfig(backend="scene", shard_size=3)
    outs = [shard_out(tmp_path, "captions", k, "jsonl") for k in range(4)]
    written = [caption_file(scenes, out, cfg, "skip", shard=(k, 4)) for k, out in enumerate(outs)]
    assert written == [3, 2, 1, 0]  # shard 3 lies past the last record: empty
    assert [[r["id"] for r in read_jsonl(o)] for o in outs] == [
        ["im0", "im1", "im2"], ["im4", "im5"], ["im6"], []]
    assert [report(o)["n_bad"] for o in outs] == [0, 1, 0, 0]
    assert report(outs[1])["items"][0]["line"] == 4
    # the gather: the split in input order, the shards' reports summed, each shard's count kept
    split = tmp_path / "captions" / "train.jsonl"
    assert gather_captions(outs, split) == 6
    assert [r["id"] for r in read_jsonl(split)] == [f"im{i}" for i in (0, 1, 2, 4, 5, 6)]
    summed = report(split)
    assert summed["n_bad"] == 1 and summed["counts"] == {"undecodable line": 1}
    assert [s["n_bad"] for s in summed["per_shard"]] == [0, 1, 0, 0]
    # a shard never takes lines the plan does not give it
    with pytest.raises(SystemExit, match="more than 2 shards"):
        caption_file(scenes, tmp_path / "x.jsonl", cfg, "skip", shard=(1, 2))


def test_an_hf_shard_without_records_loads_no_captioner(tmp_path, monkeypatch):
    scenes = write_world(tmp_path, 2)

    def refuse(self, cfg):
        raise AssertionError("the captioner was loaded for an empty shard")
    monkeypatch.setattr(HFCaptioner, "__init__", refuse)
    cfg = CaptionerConfig(backend="hf", model="unused", shard_size=2)
    out = shard_out(tmp_path, "captions", 1, "jsonl")
    assert caption_file(scenes, out, cfg, "skip", shard=(1, 2)) == 0
    assert out.read_text() == "" and report(out)["n_bad"] == 0


def captions_shard(root: Path, k: int, ids: list[int], corrupt: set[int] = frozenset()) -> Path:
    images = root / "world" / "train" / "images"
    rows = [{"id": f"im{i}", "caption": "x",
             "image": str(write_corrupt(images / f"im{i}.png") if i in corrupt
                          else write_png(images / f"im{i}.png", seed=i))} for i in ids]
    path = shard_out(root, "captions", k, "jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_latent_shards_gather_into_the_unsharded_split_with_bad_images_counted_per_shard(
        tiny_config, tmp_path):
    cfg = load_run(tiny_config({"data.encode_batch_size": 2}))
    cpu = torch.device("cpu")
    plan = [[0, 1, 2], [3, 4, 5], [], [6]]  # shard 2 empty, im4 corrupt
    captions = [captions_shard(tmp_path, k, ids, corrupt={4}) for k, ids in enumerate(plan)]
    outs = [shard_out(tmp_path, "latents", k, "safetensors") for k in range(len(plan))]
    shapes = [encode_split(c, o, cfg, cpu, allow_empty=True) for c, o in zip(captions, outs)]
    assert shapes == [(3, 48, 8, 8), (2, 48, 8, 8), (0,), (1, 48, 8, 8)]
    split = tmp_path / "latents" / "train.safetensors"
    assert gather_latents(outs, split) == (6, 48, 8, 8)
    latents, ids = load_latents(split)
    assert ids == ["im0", "im1", "im2", "im3", "im5", "im6"]
    summed = report(split)
    assert summed["n_bad"] == 1 and summed["counts"] == {"corrupt image": 1}
    assert [s["n_bad"] for s in summed["per_shard"]] == [0, 1, 0, 0]
    assert "im4.png" in summed["items"][0]["file"]
    # the same images encoded in one job: bitwise the same latents, in the same order
    whole = tmp_path / "captions" / "whole.jsonl"
    whole.write_text("".join(c.read_text() for c in captions))
    encode_split(whole, tmp_path / "whole.safetensors", cfg, cpu)
    assert torch.equal(latents, load_latents(tmp_path / "whole.safetensors")[0])
    # an empty shard stops only where it is not one shard of a split
    with pytest.raises(SystemExit, match="no record"):
        encode_split(captions[2], tmp_path / "empty.safetensors", cfg, cpu)


def test_gather_refuses_mixed_shards_and_a_split_without_latents(tmp_path):
    def shard(k, latents, ids, codec):
        path = shard_out(tmp_path, "latents", k, "safetensors")
        save_latents(path, latents, ids, codec)
        path.with_name(path.stem + ".bad_inputs.json").write_text(json.dumps(
            {"policy": "skip", "n_bad": 0, "counts": {}, "items": []}))
        return path

    a = shard(0, torch.zeros(2, 4, 2, 2), ["a", "b"], {"kind": "autoencoder_kl"})
    b = shard(1, torch.zeros(1, 4, 2, 2), ["c"], {"kind": "pixel_shuffle"})
    with pytest.raises(SystemExit, match="differ in codec"):
        gather_latents([a, b], tmp_path / "out.safetensors")
    c = shard(2, torch.zeros(1, 4, 2, 2), ["a"], {"kind": "autoencoder_kl"})
    with pytest.raises(SystemExit, match="more than one shard"):
        gather_latents([a, c], tmp_path / "out.safetensors")
    empty = shard(3, torch.zeros(0), [], {"kind": "autoencoder_kl"})
    with pytest.raises(SystemExit, match="no latents in any"):
        gather_latents([empty], tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_paper_plan_has_245_gpu_caption_and_latents_jobs_for_a_million_images(paper_config,
                                                                               tmp_path):
    """The acceptance check: n_train 1,000,000 in shards of 4,096 -> 245 train shards, each
    captioned and encoded in its own SLURM GPU job, gathered by one CPU job per split."""
    raw, env = paper_config
    raw["data"]["n_train"] = 1_000_000
    raw["data"]["captioner"]["shard_size"] = 4096
    config = tmp_path / "paper.yaml"
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    rc, out = snakemake("--profile", "slurm", "--configfile", config, "-n", "results/table1.csv",
                        "-F", env=env)
    assert rc == 0, out[-3000:]
    heldout = n_shards(raw["data"]["n_heldout"], 4096)
    for rule in ("caption", "latents"):
        blocks = jobs(out, rule)
        split = [re.search(r"wildcards: split=(\w+), shard=(\d+)", b).groups() for b in blocks]
        train = sorted(s for sp, s in split if sp == "train")
        assert train == [shard_name(k) for k in range(245)], rule
        assert len(split) == 245 + heldout
        for block in blocks:
            assert re.search(r"\bgpu=1\b", block) and "slurm_partition=gpu" in block, block
    for rule in ("caption_gather", "latents_gather"):
        blocks = jobs(out, rule)
        assert len(blocks) == 2 and not any(re.search(r"\bgpu=", b) for b in blocks)
    (gather,) = [b for b in jobs(out, "latents_gather") if "split=train" in b]
    inputs = gather.split("output:")[0]
    assert inputs.count("results/paper/latents/shards/train/") == 2 * 245  # shards + reports


# ---- a killed sharded caption run ------------------------------------------------------------

# Runs every entry point for real, except the caption job of shard 1 while KILLED does not exist
# yet: it waits until the other shards of the split are written and recorded finished by
# Snakemake (two jobs run at once), leaves
# the temp file a kill leaves behind, creates KILLED and hangs there, to be killed with the run.
HANG = r'''
import os, sys, time
from pathlib import Path
args = sys.argv[1:]
if args[1] == "xfusion.caption" and int(args[args.index("--shard") + 1]) == 1:
    killed = Path(os.environ["KILLED"])
    out = Path(args[args.index("--out") + 1])
    others = [out.with_name(f"{k:06d}.jsonl") for k in (0, 2)]
    if not killed.exists():
        deadline = time.time() + 240
        while not all(p.exists() for p in others) and time.time() < deadline:
            time.sleep(0.2)
        # a shard's file exists before Snakemake records its job as finished: wait until only
        # this job's incomplete marker is left (the working directory is the run's), or a kill
        # now would rightly leave shard 2 incomplete too
        markers = Path(".snakemake") / "incomplete"
        while markers.is_dir() and len(list(markers.iterdir())) > 1 and time.time() < deadline:
            time.sleep(0.2)
        (out.parent / f".{out.name}.half.partial").write_text("{}\n")
        killed.write_text("hanging")
        time.sleep(600)
os.execv(os.environ["REAL_PYTHON"], [os.environ["REAL_PYTHON"], *args])
'''


def test_a_killed_sharded_caption_run_reruns_only_its_unfinished_shards(tiny_config, tmp_path):
    r = tmp_path / "r"
    config = tiny_config({"results_dir": str(r), "data.n_train": 12, "data.n_heldout": 4,
                          "data.n_align": 4, "data.captioner.shard_size": 4,
                          "data.n_corpus_facts": 215, "data.n_corpus_descriptions": 20,
                          "data.mmlu_test_per_subject": 2, "data.mmlu_dev_per_subject": 1})
    hang = tmp_path / "hang.py"
    hang.write_text(f"#!{sys.executable}\n{HANG}")
    hang.chmod(0o755)
    env = dict(os.environ, XFUSION_PYTHON=str(hang), REAL_PYTHON=sys.executable,
               KILLED=str(tmp_path / "killed"), OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    shards = [r / "captions" / "shards" / "train" / f"{shard_name(k)}.jsonl" for k in range(3)]
    split = r / "captions" / "train.jsonl"

    def smk(*args):
        proc = subprocess.run([str(SNAKEMAKE), "-s", str(ROOT / "Snakefile"), "-d", str(tmp_path),
                               "--cores", "1", "--rerun-incomplete", *map(str, args),
                               "--configfile", str(config)], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        return proc.stdout + proc.stderr

    # the split's run, killed (SIGKILL to snakemake and its jobs) while shard 1 is captioned
    run = subprocess.Popen([str(SNAKEMAKE), "-s", str(ROOT / "Snakefile"), "-d", str(tmp_path),
                            "--cores", "2", split, "--configfile", str(config)], cwd=tmp_path,
                           env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    try:
        deadline = time.time() + 600  # a hang guard: world + shard 0 took over 300 s at load 16
        while not (tmp_path / "killed").exists():
            assert run.poll() is None and time.time() < deadline, "shard 1 never started"
            time.sleep(0.5)
    finally:
        os.killpg(run.pid, signal.SIGKILL)  # the run's own session: snakemake and its jobs
        run.wait()
    smk("--unlock")  # a killed Snakemake leaves its lock
    assert [p.exists() for p in shards] == [True, False, True] and not split.exists()
    finished = {p: p.stat().st_mtime_ns for p in (shards[0], shards[2])}
    planned = smk(split, "-n")
    assert set(job_counts(planned)) == {"caption", "caption_gather"}  # not the world
    assert [re.search(r"shard=(\d+)", b).group(1) for b in jobs(planned, "caption")] == ["000001"]
    # the rerun does exactly that and gathers the whole split, in order
    done = smk(split)
    assert job_counts(done) == {"caption": 1, "caption_gather": 1}
    assert {p: p.stat().st_mtime_ns for p in finished} == finished
    assert [row["id"] for row in read_jsonl(split)] == [
        row["id"] for row in read_jsonl(r / "world" / "train" / "scenes.jsonl")]
    assert len(read_jsonl(split)) == 12
