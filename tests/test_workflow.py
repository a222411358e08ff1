"""The DAG as Snakemake plans it (dry runs only; the entry points are not run here)."""

import copy
import json
import os
import re
import subprocess
import sys
import zipfile
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import yaml

from xfusion.config import ARCHITECTURES, all_runs, apply_overrides, experiments_from_dict
from xfusion.config import load_yaml, resolve_run
from xfusion.shards import n_shards

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).with_name("snakemake")
TINY = load_yaml(ROOT / "config" / "tiny.yaml")


def snakemake(*args, cwd=ROOT, env=None):
    proc = subprocess.run([str(SNAKEMAKE), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


def job_counts(output: str) -> dict[str, int]:
    table = output.split("Job stats:")[1].split("total")[0]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}


def jobs(output: str, rule: str) -> list[str]:
    """The dry run's description block of each job of `rule`."""
    return [b for b in re.split(r"\n(?=\[|rule |localrule )", output)
            if re.match(rf"(local)?rule {rule}:", b.strip())]


@pytest.fixture(scope="module")
def tiny_plan(tmp_path_factory):
    """Plan everything (-F) into a temp results dir, so existing results don't hide jobs."""
    raw = dict(TINY, results_dir=str(tmp_path_factory.mktemp("r") / "tiny"))
    path = tmp_path_factory.mktemp("c") / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    rc, out = snakemake("-n", "-F", "--cores", "2", "--configfile", str(path))
    assert rc == 0, out[-3000:]
    return out


def test_lint_is_clean():
    rc, out = snakemake("--lint")
    assert rc == 0 and "Congratulations, your workflow is in a good condition" in out, out[-3000:]


def test_tiny_dry_run_plans_every_table_and_figure(tiny_plan):
    """Per scale under its results_dir, and each table copied to results/<experiment>.csv."""
    for name, exp in experiments_from_dict(TINY).items():
        assert f"/tiny/tables/{name}.csv" in tiny_plan
        assert f"output: results/{name}.csv" in tiny_plan
        if exp.kind == "figure":
            assert f"/tiny/figures/{name}.png" in tiny_plan
            assert f"/tiny/figures/{name}.pdf" in tiny_plan
    # the findings scorecard, computed from the tables and published like them
    assert "/tiny/tables/findings.csv" in tiny_plan and "output: results/findings.csv" in tiny_plan
    assert "/tiny/figures/findings.png" in tiny_plan
    (block,) = jobs(tiny_plan, "findings")
    assert "input: " in block and "/tiny/tables/table1.csv" in block.split("output:")[0]


def test_each_run_trained_once_and_shared_runs_not_duplicated(tiny_plan):
    counts = job_counts(tiny_plan)
    runs = all_runs(TINY)
    assert counts["train_run"] == len(runs)
    trained = [re.search(r"wildcards: run=(\w+)", b).group(1) for b in jobs(tiny_plan, "train_run")]
    assert sorted(trained) == sorted(runs)  # dual_tower appears in 6 experiments, trained once
    # each run once per seed: its replicates are runs of their own, shared like it
    seeds = TINY["seeds"]
    assert seeds >= 3 and {"dual_tower", "dual_tower_seed1", "dual_tower_seed2"} <= set(trained)
    assert len(trained) == seeds * len({g for e in experiments_from_dict(TINY).values()
                                        for g in e.groups})
    assert counts["world"] == 1 and counts["tokenizer"] == 1 and counts["judges"] == 1
    # one caption and one latents job per shard of each split, one gather each per split
    size = TINY["data"]["captioner"]["shard_size"]
    shards = sum(n_shards(TINY["data"][n], size) for n in ("n_train", "n_heldout"))
    assert shards > 2  # the tiny world has a split of more than one shard
    assert counts["caption"] == counts["latents"] == shards
    assert counts["caption_gather"] == counts["latents_gather"] == 2
    assert counts["base_lm"] == 3  # tiny_base, tiny_s, tiny_l (Supp. Fig. B sizes)
    assert counts["aggregate"] == len(experiments_from_dict(TINY))
    # the findings scorecard: one job from the tables, published like them
    assert counts["findings"] == 1 and counts["publish"] == counts["aggregate"] + 1
    assert counts["linear_probe"] == 2 * seeds and counts["caption_metrics"] == 1
    # ground-truth attribute metrics wherever FID is measured; their classifier trained once
    assert counts["attribute_classifier"] == 1
    assert counts["geneval"] == counts["caption_attributes"] == counts["fid"]


def test_the_base_most_runs_wait_on_is_scheduled_first(tiny_plan):
    """Snakemake runs the ready job of highest priority first: tiny_base, not a side base."""
    priority = {re.search(r"wildcards: base=(\w+)", b).group(1):
                int(re.search(r"priority: (\d+)", b).group(1)) for b in jobs(tiny_plan, "base_lm")}
    waiting = Counter(resolve_run(TINY, run).model.base_lm.name for run in all_runs(TINY))
    assert priority == dict(waiting)
    assert max(priority, key=priority.get) == TINY["model"]["base_lm"]["name"]


def test_one_seed_fast_path_trains_each_run_once(tmp_path):
    """`make demo-fast`: --config seeds=1 plans one training per declared run, no replicate."""
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(dict(TINY, results_dir=str(tmp_path / "tiny")), sort_keys=False))
    # the target first: --configfile and --config take every argument after them
    rc, out = snakemake("all", "-n", "-F", "--cores", "2", "--configfile", str(path),
                        "--config", "seeds=1")
    assert rc == 0, out[-3000:]
    trained = [re.search(r"wildcards: run=(\w+)", b).group(1) for b in jobs(out, "train_run")]
    declared = {g for e in experiments_from_dict(TINY).values() for g in e.groups}
    assert sorted(trained) == sorted(declared) and not any("_seed" in r for r in trained)
    assert job_counts(out)["findings"] == 1


def test_metrics_at_each_eval_step_for_curves_and_last_step_for_tables(tiny_plan):
    fid_jobs = {re.search(r"wildcards: run=(\w+), step=(\d+)", b).groups()
                for b in jobs(tiny_plan, "fid")}
    first, last = map(str, resolve_run(TINY, "ratio_50_50").training.eval_steps)
    assert ("ratio_50_50", first) in fid_jobs and ("ratio_50_50", last) in fid_jobs
    assert ("gated_tower", last) in fid_jobs and ("gated_tower", first) not in fid_jobs
    mmlu_jobs = {re.search(r"wildcards: run=(\w+), step=(\d+)", b).groups()
                 for b in jobs(tiny_plan, "mmlu")}
    tables = [e for e in experiments_from_dict(TINY).values() if e.kind == "table"]
    assert {"table1", "lr_ratio", "seeds"} <= {e.name for e in tables}
    assert {run for run, _ in mmlu_jobs} == set().union(*(e.runs for e in tables))


def test_shell_commands_follow_interfaces(tmp_path):
    rc, out = snakemake("-n", "-p", "--cores", "2", "-F", "results/tiny/runs/dual_tower/done.json")
    assert rc == 0, out[-3000:]
    train = jobs(out, "train_run")[0]
    assert re.search(r"-m xfusion\.train --config \S+ --run dual_tower --base-lm "
                     r"results/tiny/base_lm/tiny_base/base_model\.json --latents "
                     r"results/tiny/latents/train\.safetensors --captions "
                     r"results/tiny/captions/train\.jsonl\s+--out results/tiny/runs/dual_tower", out)
    assert "srun" not in train  # one local process


def test_paper_dry_run_via_slurm_profile_lists_gpu_training_for_four_architectures(
        paper_config, tmp_path):
    raw, env = paper_config  # its data folders and base LLMs resolvable here
    config = tmp_path / "paper.yaml"
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    rc, out = snakemake("--profile", "slurm", "--configfile", config, "-n", "results/table1.csv",
                        "-F", env=env)
    assert rc == 0, out[-3000:]
    train = jobs(out, "train_run")
    runs = {re.search(r"wildcards: run=(\w+)", b).group(1) for b in train}
    assert runs == set(ARCHITECTURES) - {"x_fuse", "x_fuse_dit"}  # figure8's, not table1's
    for block in train:
        assert re.search(r"gpu=8\b", block) and "tasks_per_gpu=1" in block and "mpi=srun" in block
        assert "slurm_partition=gpu" in block and "runtime=4320" in block
    assert not jobs(out, "judges")  # paper scale loads CLIP / BLIP-2 / Inception
    assert not jobs(out, "align_encoder")  # and REPA aligns to a pretrained CLIP
    # no scene records at paper scale: no attribute classifier, no attribute metrics
    assert not jobs(out, "attribute_classifier") and not jobs(out, "geneval")
    assert not jobs(out, "caption_attributes")
    assert "results/paper/" in out and "results/tiny/" not in out


def test_paper_dry_run_samples_and_measures_fid_on_the_coco_split(paper_config, tmp_path):
    raw, env = paper_config  # data.eval.coco_* point at a stand-in COCO captions file and folder
    config = tmp_path / "paper.yaml"
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    rc, out = snakemake("--profile", "slurm", "--configfile", config, "-n", "results/table1.csv",
                        "results/figureE.csv", "-F", env=env)
    assert rc == 0, out[-3000:]
    [coco] = jobs(out, "coco")
    assert "xfusion.data.coco" in coco and f"--train {raw['data']['image_dir']}" in coco
    assert "results/paper/world/coco/prompts.jsonl" in coco
    # T2I prompts: the COCO split's human captions; I2T: its images; FID: its images
    for block in jobs(out, "sample_t2i"):
        assert "--prompts results/paper/world/coco/prompts.jsonl" in block
    for block in jobs(out, "sample_i2t"):
        assert "--latents results/paper/latents/coco.safetensors" in block
    for block in jobs(out, "fid"):
        assert "--reference results/paper/world/coco/images" in block
    assert jobs(out, "fid") and jobs(out, "sample_i2t")
    # our captioner's long captions of the COCO images (Fig. E, and the I2T latents' records)
    assert any("results/paper/world/coco/scenes.jsonl" in b for b in jobs(out, "caption"))
    [figure_e] = jobs(out, "caption_metrics")
    assert "--scenes results/paper/world/coco/scenes.jsonl" in figure_e
    assert "--captions results/paper/captions/coco.jsonl" in figure_e
    assert "heldout" not in "".join(jobs(out, "sample_t2i") + jobs(out, "fid") + [figure_e])


def test_tiny_probe_reads_the_worlds_probe_set_through_the_image_folder_path(tiny_plan):
    """data.probe.* null: rule probe_world writes the world's images by shape as ImageFolders,
    probe_data encodes each split once, and every probed step reads both encoded sets."""
    counts = job_counts(tiny_plan)
    assert counts["probe_world"] == 1 and counts["probe_data"] == 2
    (world,) = jobs(tiny_plan, "probe_world")
    R = re.search(r"output: (\S+)/world/probe/train, \1/world/probe/val", world).group(1)
    for split in ("train", "val"):
        block = next(b for b in jobs(tiny_plan, "probe_data") if f"probe_split={split}" in b)
        assert f"input: {R}/world/probe/{split}\n" in block
        assert f"output: {R}/probe/{split}.safetensors" in block
    probes = jobs(tiny_plan, "linear_probe")
    assert probes and all(f"{R}/probe/train.safetensors, {R}/probe/val.safetensors" in block
                          for block in probes)


def test_paper_dry_run_plans_the_imagenet_probe_for_figure_d(paper_config, tmp_path):
    """Supp. Fig. D at paper scale: each ImageNet split (data.probe.*, ImageFolder) encoded once on
    a GPU, then the probe of each run's last step on a GPU; no tiny-world probe set."""
    raw, env = paper_config
    config = tmp_path / "paper.yaml"
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    rc, out = snakemake("--profile", "slurm", "--configfile", config, "-n",
                        "results/paper/figures/figureD.png", "-F", env=env)
    assert rc == 0, out[-3000:]
    assert not jobs(out, "probe_world")
    encode = jobs(out, "probe_data")
    assert len(encode) == 2
    for split in ("train", "val"):
        folder = raw["data"]["probe"][f"{split}_dir"]
        block = next(b for b in encode if f"probe_split={split}" in b)
        assert f"--images {folder} --out results/paper/probe/{split}.safetensors" in block
        assert re.search(r"gpu=1\b", block) and "slurm_partition=gpu" in block
    probes = jobs(out, "linear_probe")
    runs = {re.search(r"wildcards: run=(\w+)", b).group(1) for b in probes}
    assert runs == set(experiments_from_dict(raw)["figureD"].runs)
    for block in probes:
        assert "--train results/paper/probe/train.safetensors" in block
        assert re.search(r"gpu=1\b", block)


# ---- the DAG executed with stand-in entry points ------------------------------------------------

STAND_IN = r'''
"""Stand-in for `python -m <entry point>`: writes what docs/INTERFACES.md says each one writes
(placeholders), and runs eval.aggregate / eval.plots / eval.findings for real."""
import json, os, sys
from pathlib import Path
args = sys.argv[1:]
assert args[0] == "-m", args
module, rest = args[1], args[2:]
if module in ("eval.aggregate", "eval.plots", "eval.findings"):
    os.execv(os.environ["REAL_PYTHON"], [os.environ["REAL_PYTHON"], *args])
with open(os.environ["STAND_IN_LOG"], "a") as fh:
    fh.write(json.dumps(args) + "\n")
opt = lambda name: rest[rest.index(name) + 1] if name in rest else None
out = Path(opt("--out"))
def write(path, text="{}\n"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
def metric(value, details=None):  # named as the file: the metric's one name
    write(out, json.dumps({"metric": out.stem, "value": value, "run": opt("--run"),
                           "step": int(opt("--step")) if opt("--step") else None, "n": 1,
                           "details": details or {}}))
if module == "xfusion.data.world":
    for split in ("train", "heldout", "align"):
        write(out / split / "scenes.jsonl")
        (out / split / "images").mkdir(parents=True, exist_ok=True)
    write(out / "corpus.txt", "fact\n")
    (out / "mmlu").mkdir(parents=True, exist_ok=True)
elif module in ("xfusion.tokenizer", "eval.judges", "eval.attribute_classifier",
                "xfusion.align_encoder"):
    out.mkdir(parents=True, exist_ok=True)
elif module == "xfusion.data.world_probe":
    for split in ("train", "val"):
        (out / split).mkdir(parents=True, exist_ok=True)
elif module == "xfusion.pretrain_lm":
    write(out / "base_model.json")
elif module == "xfusion.pretrain_dit":
    write(out / "dit_model.json")
elif module == "eval.figure7":
    for path in rest[rest.index("--out") + 1:]:
        write(Path(path))
elif module == "xfusion.train":
    import yaml  # the recipe's eval steps (no run of these experiments overrides them)
    steps = yaml.safe_load(Path(opt("--config")).read_text())["training"]["eval_steps"]
    for step in steps:
        (out / "steps" / str(step)).mkdir(parents=True, exist_ok=True)
    write(out / "train_log.jsonl", "".join(json.dumps(
        {"step": s, "t2i_tokens_seen": 10 * s, "i2t_tokens_seen": 5 * s}) + "\n" for s in steps))
    write(out / "done.json")
elif module == "xfusion.sample" and opt("--mode") == "t2i":
    write(out / "index.jsonl")
elif module in ("xfusion.caption", "xfusion.latents", "xfusion.gather"):
    write(out)  # a shard or a gathered split, and its bad-input report
    write(out.with_name(out.stem + ".bad_inputs.json"))
elif module in ("xfusion.sample", "xfusion.probe_data"):
    write(out)
elif module == "eval.linear_probe":
    metric(0.5, {"per_layer": {m: {"1": 0.5, "2": 0.6} for m in ("understanding", "generation")}})
elif module == "eval.caption_metrics":
    metric(50.0, {"rows": {"long_detailed_caption": {"bertscore": 0.8, "clip": 25.0, "blip": 80.0},
                           "short_poor_caption": {"bertscore": 0.85, "clip": 25.0, "blip": 30.0}}})
else:  # fid, clip_score, itm, mmlu, geneval, caption_attributes (the last three: fractions)
    metric(0.3 if module in ("eval.mmlu", "eval.geneval", "eval.caption_attributes") else 20.0)
'''


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """table1 + figure5 + figureE executed in a scratch working directory with stand-ins."""
    work = tmp_path_factory.mktemp("work")
    for name in ("reference", "config"):
        (work / name).symlink_to(ROOT / name)
    stand_in = work / "stand_in.py"
    stand_in.write_text(f"#!{sys.executable}\n{STAND_IN}")
    stand_in.chmod(0o755)
    env = dict(os.environ, XFUSION_PYTHON=str(stand_in), REAL_PYTHON=sys.executable,
               STAND_IN_LOG=str(work / "calls.jsonl"), OMP_NUM_THREADS="1")

    def run(*args, targets=TARGETS):
        proc = subprocess.run([str(SNAKEMAKE), "-s", str(ROOT / "Snakefile"), "-d", str(work),
                               "--cores", "2", *targets, *args],
                              cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        return proc.stdout + proc.stderr

    run()
    return work, run


TARGETS = ["results/table1.csv", "results/tiny/figures/figure5.png",
           "results/tiny/figures/figureE.png"]


def test_dag_runs_end_to_end_with_stand_in_entry_points(executed):
    work, _ = executed
    table = pd.read_csv(work / "results" / "tiny" / "tables" / "table1.csv")
    assert list(table.variant) == ["tiny_base", "single_tower", "gated_tower", "dual_projection",
                                   "dual_tower"]
    trained = table.iloc[1:]  # below the base LLM row (MMLU only)
    assert trained.blip.notna().all() and trained.fid.notna().all()  # one metric name, end to end
    # the user's target is a copy of the scale's table
    assert (work / "results" / "table1.csv").read_bytes() == (
        work / "results" / "tiny" / "tables" / "table1.csv").read_bytes()
    assert (work / "results" / "tiny" / "figures" / "figure5.pdf").stat().st_size > 1000
    assert not (work / "results" / "figures").exists()
    metrics = {p.name for p in (work / "results" / "tiny" / "metrics").rglob("*.json")}
    assert {"fid.json", "clip.json", "blip.json", "mmlu.json"} <= metrics
    assert not {"itm.json", "clip_score.json", "blip_itm.json"} & metrics
    calls = [json.loads(l) for l in (work / "calls.jsonl").read_text().splitlines()]
    trains = [c[c.index("--run") + 1] for c in calls if c[1] == "xfusion.train"]
    assert sorted(trains) == sorted(set(trains))  # dual_tower (table1 + figure5) trained once


def test_complete_run_is_up_to_date(executed):
    _, run = executed
    assert "Nothing to be done" in run("-n")


def test_forcerun_train_reruns_exactly_its_dependents(executed):
    _, run = executed
    counts = job_counts(run("-n", "--forcerun", "train_run"))
    assert set(counts) == {"train_run", "sample_t2i", "sample_i2t", "fid", "clip_score", "itm",
                           "geneval", "caption_attributes", "mmlu", "aggregate", "publish",
                           "plot"}
    # not data, base LLM, judges, attribute classifier, base MMLU
    # table1's 4 architectures + figure5's other 4 ratios, each with its seeds
    assert counts["train_run"] == 8 * TINY["seeds"]


def test_forcing_one_run_reruns_only_that_run_and_its_figure(executed):
    _, run = executed
    out = run("-n", "--forcerun", "results/tiny/runs/ratio_50_50/done.json")
    counts = job_counts(out)
    assert counts["train_run"] == 1 and counts["fid"] == 2 and counts["aggregate"] == 1
    assert "output: results/tiny/tables/figure5.csv" in out
    assert "output: results/tiny/tables/table1.csv" not in out


def test_report_bundles_tables_and_figures(executed):
    work, run = executed
    run("--report", str(work / "report.zip"))
    with zipfile.ZipFile(work / "report.zip") as archive:
        names = archive.namelist()
    assert any(n.endswith("table1.csv") for n in names)
    assert any(n.endswith("figure5.png") for n in names)


def test_a_new_figure_of_an_existing_measure_is_config_only(executed, tmp_path):
    """A config that declares one more figure over trained runs gets its CSV and figure from the
    existing rules: only aggregate and plot run, no code names the experiment."""
    work, run = executed
    raw = load_yaml(ROOT / "config" / "tiny.yaml")
    raw["experiments"]["blip_by_ratio"] = {
        "caption": "BLIP against I2T tokens seen, two T2I shares.",
        "measure": "curves", "steps": "every", "metrics": ["blip"],
        "settings": {"t2i_ratio": "training.t2i_ratio"}, "tokens_seen": True,
        "plot": {"x": {"blip": "i2t_tokens_seen"}, "legend": "T2I share {t2i_ratio:.0%}"},
        "runs": {"dual_tower": {}, "ratio_50_50": {"training.t2i_ratio": 0.5}}}
    config = tmp_path / "extra.yaml"
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    out = run("--configfile", str(config), targets=["results/tiny/tables/blip_by_ratio.csv",
                                                    "results/tiny/figures/blip_by_ratio.png"])
    assert job_counts(out) == {"aggregate": 1, "plot": 1}
    frame = pd.read_csv(work / "results" / "tiny" / "tables" / "blip_by_ratio.csv")
    assert list(frame.columns) == ["run", "step", "n_seeds", "blip", "blip_t95_low",
                                   "blip_t95_high", "t2i_ratio", "t2i_tokens_seen",
                                   "i2t_tokens_seen"]
    first, last = resolve_run(TINY, "dual_tower").training.eval_steps
    assert frame.blip.tolist() == [20.0] * 4  # the stand-in's value, at both eval steps
    assert frame.i2t_tokens_seen.tolist() == [5 * first, 5 * last] * 2
    png = work / "results" / "tiny" / "figures" / "blip_by_ratio.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_findings_scorecard_is_computed_from_the_configs_tables(executed, tmp_path):
    """results/findings.csv from the tables alone: with a config of table1 and figure5 only,
    just the scorecard runs (every table it reads is there), one row per declared finding, and
    the findings of experiments the config lacks are inconclusive rows, not missing ones."""
    from eval.findings import declared

    work, run = executed
    raw = load_yaml(ROOT / "config" / "tiny.yaml")
    raw["experiments"] = {k: raw["experiments"][k] for k in ("table1", "figure5", "figureE")}
    config = tmp_path / "subset.yaml"
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    out = run("--configfile", str(config), targets=["results/findings.csv"])
    assert job_counts(out) == {"findings": 1, "publish": 1}
    card = pd.read_csv(work / "results" / "findings.csv")
    names = [f.name for f in declared(load_yaml(ROOT / "reference" / "findings.yaml"))]
    assert card.finding.tolist() == names
    absent = card[card.finding.str.startswith(("figure6", "figure8", "figureB", "figureD"))]
    assert len(absent) == 8 and (absent.verdict == "inconclusive").all()
    assert absent.note.str.contains("not measured here").all()
    measured = card[card.finding.str.startswith(("table1", "figure5"))]
    assert measured.effect.notna().all() and measured.seeds.str.startswith("3").all()
    assert (work / "results" / "tiny" / "figures" / "findings.pdf").stat().st_size > 1000
    run("--configfile", str(config), "--report", str(tmp_path / "report.zip"),
        targets=["results/findings.csv"])
    with zipfile.ZipFile(tmp_path / "report.zip") as archive:
        assert any(n.endswith("findings.csv") for n in archive.namelist())


def test_results_copy_follows_the_scale_run(executed, tmp_path):
    """results/<experiment>.csv is the table of the config Snakemake ran last: another
    results_dir remakes it from there, and the first one's run remakes it back."""
    work, run = executed
    raw = dict(load_yaml(ROOT / "config" / "tiny.yaml"), results_dir="results/other")
    config = tmp_path / "other.yaml"
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    other = run("--configfile", str(config), targets=["results/figureE.csv"])
    publish = jobs(other, "publish")
    assert len(publish) == 1 and "input: results/other/tables/figureE.csv" in publish[0]
    copy = work / "results" / "figureE.csv"
    assert copy.read_bytes() == (work / "results" / "other" / "tables" / "figureE.csv").read_bytes()
    back = jobs(run(targets=["results/figureE.csv"]), "publish")
    assert len(back) == 1 and "input: results/tiny/tables/figureE.csv" in back[0]
    assert copy.read_bytes() == (work / "results" / "tiny" / "tables" / "figureE.csv").read_bytes()


def test_paper_dry_run_after_the_tiny_dag_still_plans_the_paper_jobs(executed, paper_config,
                                                                      tmp_path):
    """After `make demo` (here the tiny DAG) wrote results/table1.csv, the user's paper-scale
    command plans the paper DAG: the tiny copy does not satisfy the paper-scale target."""
    work, _ = executed
    assert (work / "results" / "table1.csv").exists()
    raw, env = paper_config
    config = tmp_path / "paper.yaml"
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    rc, out = snakemake("-s", ROOT / "Snakefile", "-d", work, "--profile", ROOT / "slurm",
                        "--configfile", config, "-n", "results/table1.csv", cwd=work, env=env)
    assert rc == 0, out[-3000:]
    assert "Nothing to be done" not in out
    counts = job_counts(out)
    assert counts["train_run"] == 4 and counts["publish"] == 1  # table1's four architectures
    assert "input: results/paper/tables/table1.csv" in jobs(out, "publish")[0]


# ---- reruns after a config change: exactly the jobs that read the changed keys -----------------

PROBE = "results/tiny/figures/figureD.png"  # Supp. Fig. D: the linear probe of dual_tower and noise_50


@pytest.fixture(scope="module")
def executed_with_probe(executed):
    """`executed` with Supp. Fig. D run to completion too; `plan(raw, *args)` dry-runs the
    finished DAG under the config `raw` and returns ({rule: {wildcards of each job}}, output)."""
    work, run = executed
    run(PROBE)

    def plan(raw, *args):
        path = work / "changed.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        out = run(PROBE, "-n", "--configfile", str(path), *args)
        return planned(out), out

    return plan


def planned(output: str) -> dict[str, set[str]]:
    """{rule: {the wildcards of each of its jobs}} of a dry run's job list."""
    if "Nothing to be done" in output:
        return {}
    return {rule: {m.group(1) if (m := re.search(r"wildcards: (.*)", block)) else ""
                   for block in jobs(output, rule)} for rule in job_counts(output)}


def replicates(run: str) -> tuple[str, ...]:
    """The run and its seed replicates (xfusion.config.seed_replicates)."""
    return next(e.groups[run] for e in experiments_from_dict(TINY).values() if run in e.groups)


def changed(dotted: str, value, run: str | None = None) -> dict:
    """tiny.yaml with `dotted` set in the recipe, or in the overrides of `run` wherever an
    experiment declares it (a run means the same overrides everywhere)."""
    raw = copy.deepcopy(TINY)
    if run is None:
        return apply_overrides(raw, {dotted: value})
    for spec in raw["experiments"].values():
        if run in (spec.get("runs") or {}):
            spec["runs"][run] = {**(spec["runs"][run] or {}), dotted: value}
    return raw


def test_complete_run_is_up_to_date_under_an_unchanged_or_cosmetic_config(executed_with_probe):
    assert executed_with_probe(TINY)[0] == {}
    # how often the loss is logged changes no weight: no job reruns
    assert executed_with_probe(changed("training.log_every", 7))[0] == {}


def test_changing_one_runs_t2i_ratio_reruns_that_run_and_its_figure_only(executed_with_probe):
    plan, out = executed_with_probe(changed("training.t2i_ratio", 0.4, run="ratio_50_50"))
    steps = sorted(resolve_run(TINY, "ratio_50_50").training.eval_steps)
    assert len(steps) == 2  # figure5 measures every eval step
    seeds = replicates("ratio_50_50")  # the run's seed replicates change with it
    evaluated = {f"run={r}, step={s}" for r in seeds for s in steps}
    assert plan == {"train_run": {f"run={r}" for r in seeds},
                    **{rule: evaluated for rule in ("sample_t2i", "sample_i2t", "fid", "clip_score",
                                                    "itm", "geneval", "caption_attributes")},
                    "aggregate": {"experiment=figure5"}, "plot": {"experiment=figure5"}}
    train = jobs(out, "train_run")[0]
    assert "reason: Params have changed since last execution" in train


def test_changing_probe_epochs_reruns_only_probe_jobs_and_their_figure(executed_with_probe):
    plan, _ = executed_with_probe(changed("evaluation.probe_epochs", 3))
    probed = {f"run={run}, step={max(resolve_run(TINY, run).training.eval_steps)}"
              for run in (*replicates("dual_tower"), *replicates("noise_50"))}  # the last step
    assert plan == {"linear_probe": probed,
                    "aggregate": {"experiment=figureD"}, "plot": {"experiment=figureD"}}


def test_changing_cfg_scale_reruns_t2i_sampling_and_its_metrics_not_captioning(
        executed_with_probe):
    everything, _ = executed_with_probe(TINY, "-F")
    plan, _ = executed_with_probe(changed("evaluation.cfg_scale", 3.0))
    t2i = ("sample_t2i", "fid", "clip_score", "geneval")
    assert plan == {**{rule: everything[rule] for rule in t2i},
                    # the tables and figures that show a T2I metric; not figureD (the probe) nor
                    # figureE (captions of the data)
                    "aggregate": {"experiment=table1", "experiment=figure5"},
                    "plot": {"experiment=figure5"},
                    "publish": {"experiment=table1"}}  # results/table1.csv, the copy
    assert len(everything["sample_t2i"]) > len(everything["train_run"])  # every evaluated step
