"""Config validation, the run registry, paths and input functions shared by every stage.

Everything here runs when Snakemake parses the workflow, before any job: a config that
xfusion.config_check rejects (schema, typed values, references: paths, hub ids, layer indices,
evaluator names) stops the run with a message naming the dotted key.

Where tables and figures go (one rule): each scale's are real outputs under its `results_dir` R,
`R/tables/<experiment>.csv` (rule aggregate) and `R/figures/<experiment>.{png,pdf}` (rule plot);
`results/<experiment>.csv` is a plain copy of the table of the config Snakemake runs with (rule
publish), so `snakemake results/table1.csv` (tiny) and `snakemake --profile slurm
results/table1.csv` (paper) both work, and the copy is remade whenever another scale is run.
The findings scorecard is one more table and figure, `R/tables/findings.csv` and
`R/figures/findings.{png,pdf}` (rule findings, from the tables), published as results/findings.csv.

Seeds: RUNS holds every seed replicate `<run>_seed<k>` beside its run (xfusion.config
.seed_replicates), so the wildcard constraint of `run` and every per-run rule take them as runs;
the base LLMs and judges are per base name and per scale, shared by all seeds.
"""

import os
import re
import sys
from pathlib import Path

import yaml
from snakemake.exceptions import WorkflowError

from eval.findings import tables_read
from xfusion import config_check
from xfusion.config import ALIGN_ENCODER, JUDGE_NAMES, SCORECARD, ConfigError, config_schema
from xfusion.config import experiment_recipe, experiments_from_dict, load_yaml, recipe_hash
from xfusion.config import VARIANTS, run_from_dict
from xfusion.shards import n_shards, shard_name
from xfusion.io import atomic_write_text


# ---- validation -------------------------------------------------------------------------------

# The schema with the registries' enums (architectures, metrics, measures) from xfusion.config.
SCHEMA = config_schema(Path(workflow.basedir) / "workflow" / "schemas" / "config.schema.yaml")


def check_config(raw):
    """xfusion.config_check.check_config (schema, runs, references), as a WorkflowError."""
    try:
        return config_check.check_config(raw, SCHEMA)
    except ConfigError as err:
        problems = str(err).replace("\n", "\n  ")
        raise WorkflowError(f"Invalid config (stopped before any job):\n  {problems}") from None


RUNS = check_config(config)  # run name -> resolved xfusion.config.RunConfig
RECIPE = run_from_dict(config)  # the recipe without a run's overrides (data, judges, …)
EXPERIMENTS = experiments_from_dict(config)
R = config["results_dir"].rstrip("/")
# The interpreter of the entry points: the one running Snakemake (the project's venv), unless
# XFUSION_PYTHON names another (tests/test_workflow.py points it at a stand-in).
PY = os.environ.get("XFUSION_PYTHON", sys.executable)
CONDA_ENV = "../../environment.yml"  # conda users (--sdm conda); relative to workflow/rules/
# The published numbers beside ours; found from the workflow, whatever the working directory.
REFERENCE = str(Path(workflow.basedir) / "reference" / "paper_results.yaml")


def coco_eval():
    """The evaluation set is COCO (data.eval.coco_annotations set; xfusion.data.coco), not the
    held-out split: its images, human captions and our captions form a third split, `coco`."""
    return bool((config["data"].get("eval") or {}).get("coco_annotations"))


SPLITS = ("train", "heldout") + (("coco",) if coco_eval() else ())
# What sampling and the metrics read: the held-out split, or the COCO split (T2I prompts: its
# sampled human captions; I2T: its images; FID reference: its centre-cropped images).
EVAL_SPLIT = "coco" if coco_eval() else "heldout"
EVAL_SCENES = f"{R}/world/{EVAL_SPLIT}/scenes.jsonl"
EVAL_IMAGES = f"{R}/world/{EVAL_SPLIT}/images"
EVAL_CAPTIONS = f"{R}/captions/{EVAL_SPLIT}.jsonl"  # our captioner's captions of its images
EVAL_LATENTS = f"{R}/latents/{EVAL_SPLIT}.safetensors"
EVAL_PROMPTS = f"{R}/world/coco/prompts.jsonl" if coco_eval() else EVAL_CAPTIONS


def config_path():
    """The config file every entry point reads with --config: R/config.yaml, the config exactly
    as Snakemake resolved it (config file + --config overrides), rewritten only when it changes.
    Jobs thus see what Snakemake saw, and the path itself never changes (it is a params value,
    so a changing path would rerun every job; `recipe` params carry the real changes)."""
    merged = Path(R) / "config.yaml"
    text = yaml.safe_dump(dict(config), sort_keys=False)
    if not merged.exists() or merged.read_text() != text:
        atomic_write_text(merged, text)
    return str(merged)


CONFIG = config_path()


# ---- registries -------------------------------------------------------------------------------


def base_of(run):
    return RUNS[run].model.base_lm.name


def eval_steps(run):
    return sorted(RUNS[run].training.eval_steps)


def last_step(run):
    return eval_steps(run)[-1]


BASES = sorted({base_of(run) for run in RUNS})
BASE_RUN = {base: next(r for r in RUNS if base_of(r) == base) for base in BASES}  # --run for base_lm


def dit_of(run):
    """The pretrained DiT of an x_fuse_dit run (rule dit), else None."""
    model = RUNS[run].model
    return model.dit.name if VARIANTS[model.architecture].dit else None


DITS = sorted({dit_of(run) for run in RUNS} - {None})
DIT_RUN = {dit: next(r for r in RUNS if dit_of(r) == dit) for dit in DITS}  # --run for dit


def dit_input(run):
    return [f"{R}/dit/{dit_of(run)}/dit_model.json"] if dit_of(run) else []


def dit_flag(run):
    return f"--dit {dit_input(run)[0]}" if dit_of(run) else ""


def world_source():
    """The tiny world's generator writes the data (and scene records): data.source == world."""
    return config["data"]["source"] == "world"


def coco_train_images():
    """The training images the COCO split is checked against for overlap, by the coco job:
    the folder source's data.image_dir, or the world's generated train images."""
    return f"{R}/world/train/images" if world_source() else config["data"]["image_dir"]


def coco_train_input():
    """The world's train images are a job's output, data.image_dir a given folder."""
    return [coco_train_images()] if world_source() else []


# The ground-truth attribute metrics' classifier (eval.geneval reads it): world scale only, as
# those metrics read scene records (xfusion.config.METRICS, world_only).
ATTRIBUTE_CLASSIFIER = f"{R}/attribute_classifier"  # not under R/judges: that is one rule's output
FIGURES = [e for e in EXPERIMENTS if EXPERIMENTS[e].kind == "figure"]


def alternation(names):
    """A wildcard constraint matching exactly these names (none: nothing)."""
    return "|".join(re.escape(n) for n in sorted(names)) or "(?!)"


wildcard_constraints:
    run=alternation(RUNS),
    base=alternation(BASES),
    dit=alternation(DITS),
    experiment=alternation(EXPERIMENTS),
    step=r"\d+",
    split="|".join(SPLITS),


# ---- paths and input functions ---------------------------------------------------------------


CORPUS = f"{R}/world/corpus.txt"


def corpus_input():
    """The world corpus is an input at tiny scale only: the folder source writes no corpus, and
    paper-scale tokenizer and base LLM are pretrained (the entry points take the path anyway)."""
    return [CORPUS] if world_source() else []


# The linear probe's ImageFolder splits (xfusion.probe_data): data.probe.<split>_dir, or the
# tiny world's probe set (rule probe_world) where the key is null.
PROBE_SPLITS = ("train", "val")
WORLD_PROBE = f"{R}/world/probe"


def probe_images(split):
    return config["data"].get("probe", {}).get(f"{split}_dir") or f"{WORLD_PROBE}/{split}"


def probe_images_input(split):
    """The world's probe split is a job's output; a user's folder is a path, not an input (as
    data.image_dir: a folder of a million files is read, not tracked)."""
    return [] if config["data"].get("probe", {}).get(f"{split}_dir") else [f"{WORLD_PROBE}/{split}"]


def mmlu_data():
    """MMLU in hendrycks layout: the world's tiny benchmark or evaluation.mmlu_path."""
    path = config["evaluation"].get("mmlu_path")
    return path if path else f"{R}/world/mmlu"


def mmlu_input():
    return [] if config["evaluation"].get("mmlu_path") else [f"{R}/world/mmlu"]


def evaluators(run, *keys):
    """Evaluator names (evaluation.<key>) of a run, or of the recipe when run is None."""
    section = RUNS[run].evaluation.__dict__ if run else config["evaluation"]
    return [section.get(k) for k in keys]


def repa_encoder(run):
    repa = RUNS[run].model.repa
    return [repa.encoder] if repa.enabled else []


EVALUATOR_KEYS = ("fid_extractor", "clip_model", "itm_model", "bertscore_model")


def uses_judges():
    """True when a job reads R/judges: paper scale loads CLIP/BLIP-2/Inception instead."""
    names = evaluators(None, *EVALUATOR_KEYS)
    for run in RUNS:
        names += evaluators(run, *EVALUATOR_KEYS) + repa_encoder(run)
    return any(n in JUDGE_NAMES for n in names)


def judges_input(names):
    return [f"{R}/judges"] if any(n in JUDGE_NAMES for n in names) else []


def judges_flag(names):
    return f"--judges {R}/judges" if judges_input(names) else ""


# REPA's tiny-scale target, trained by the pipeline and read by no metric (xfusion.align_encoder).
ALIGN_ENCODER_DIR = f"{R}/align_encoder"
ALIGN_SPLIT = f"{R}/world/align"  # data.n_align images: the align encoder's data, no evaluator's


def align_split_outputs():
    """The world's align split, when the recipe has one (rule world)."""
    if not RECIPE.data.n_align:
        return {}
    return {"align": f"{ALIGN_SPLIT}/scenes.jsonl", "align_images": directory(f"{ALIGN_SPLIT}/images")}


def uses_align_encoder():
    return any(ALIGN_ENCODER in repa_encoder(run) for run in RUNS)


def align_encoder_input(names):
    return [ALIGN_ENCODER_DIR] if ALIGN_ENCODER in names else []


def align_encoder_flag(names):
    return f"--align-encoder {ALIGN_ENCODER_DIR}" if align_encoder_input(names) else ""


def model_dir(wildcards):
    return f"{R}/runs/{wildcards.run}/steps/{wildcards.step}"


def done(run):
    """Training's last output; the step model dirs beside it are complete once it exists."""
    return f"{R}/runs/{run}/done.json"


def metric_path(run, step, metric):
    return f"{R}/metrics/{run}/{step}/{metric}.json"


def base_mmlu(base):
    return f"{R}/metrics/base/{base}/mmlu.json"


def recipe(job, run=None):
    """The hash of the config `job` reads, as a params value: Snakemake's params rerun trigger
    then reruns exactly the jobs whose part of the config changed (the config file path never
    does). The table is xfusion.config.READS, where the hashes in the outputs come from too."""
    return recipe_hash(RUNS[run] if run else RECIPE, job)


def experiment_params(wildcards):
    """An experiment's declaration (kind, runs, caption) as a params value: a table or figure
    reruns when it changes; changed metric files rerun it as inputs."""
    return experiment_recipe(EXPERIMENTS[wildcards.experiment])


def srun_launcher(resources):
    """Multi-GPU launch: under the slurm profile `mpi` is "srun" and each task is one DeepSpeed
    rank (xfusion.engine reads SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID); locally it is empty."""
    mpi = resources.get("mpi", "")
    return f"{mpi} --ntasks={resources.tasks} --kill-on-bad-exit=1" if mpi else ""


def log(rule, pattern=""):
    name = pattern or "all"
    return f"{R}/logs/{rule}/{name}.log"


def bench(rule, pattern=""):
    name = pattern or "all"
    return f"{R}/benchmarks/{rule}/{name}.tsv"


def table_path(experiment):
    return f"{R}/tables/{experiment}.csv"


def figure_path(experiment, ext):
    return f"{R}/figures/{experiment}.{ext}"


def aggregate_inputs(wildcards):
    """Named inputs of eval.aggregate for one experiment, as its config entry declares them:
    its metrics at each run's last eval step or at every one, the base LLMs' MMLU, the training
    logs (tokens seen), the caption-metric comparison."""
    exp = EXPERIMENTS[wildcards.experiment]
    steps = {r: eval_steps(r) if exp.steps == "every" else [last_step(r)] for r in exp.runs}
    inputs = {"metrics": [metric_path(r, s, m) for r in exp.runs for s in steps[r]
                          for m in exp.metrics]}
    if exp.base or exp.changes:
        inputs["base"] = [base_mmlu(b) for b in sorted({base_of(r) for r in exp.runs})]
    if exp.tokens_seen:
        inputs["done"] = [done(r) for r in exp.runs]
    if exp.measure == "captions":
        inputs["captions"] = [f"{R}/metrics/caption_metrics.json"]
    return inputs


def aggregate_flags(wildcards, input):
    """Explicit paths for eval.aggregate: metric files, base results, training logs."""
    flags = []
    if input.get("metrics"):
        flags.append("--metrics " + " ".join(input.metrics))
    if input.get("base"):
        flags.append("--base " + " ".join(f"{Path(p).parent.name}={p}" for p in input.base))
    if input.get("done"):
        logs = [f"{Path(p).parent.name}={Path(p).parent}/train_log.jsonl" for p in input.done]
        flags.append("--train-logs " + " ".join(logs))
    if input.get("captions"):
        flags.append("--caption-metrics " + " ".join(input.captions))
    return " ".join(flags)


# ---- the sharded data stage (xfusion.shards; rules in data.smk) ---------------------------------


def split_shards(split):
    """The shard names of a split: 000000, 000001, … (xfusion.shards.n_shards). The coco split
    holds the coco rule's sample of evaluation.n_samples images (xfusion.data.coco)."""
    size = {"train": RECIPE.data.n_train, "heldout": RECIPE.data.n_heldout,
            "coco": RECIPE.evaluation.n_samples}[split]
    return [shard_name(k) for k in range(n_shards(size, RECIPE.data.captioner.shard_size))]


def caption_shard(split, shard):
    return f"{R}/captions/shards/{split}/{shard}.jsonl"


def latents_shard(split, shard):
    return f"{R}/latents/shards/{split}/{shard}.safetensors"


def shard_files(path, split):
    """`path(split, shard)` and its bad-input report for every shard of the split."""
    files = [path(split, s) for s in split_shards(split)]
    # xfusion.data.report_path, without importing torch at every parse
    reports = [str(Path(f).with_name(f"{Path(f).stem}.bad_inputs.json")) for f in files]
    return {"shards": files, "reports": reports}


# ---- the findings scorecard (eval.findings) ----------------------------------------------------

# The findings, as contrasts of our tables, beside the transcription of the papers.
FINDINGS = str(Path(workflow.basedir) / "reference" / "findings.yaml")
SCORECARD_TABLES = tables_read(load_yaml(FINDINGS))  # the experiments its findings read


def scorecard_tables(wildcards=None):
    """The tables of this config's experiments that the scorecard reads, by experiment: a
    finding whose experiment this config lacks gets an inconclusive row, not a missing input."""
    return {e: table_path(e) for e in SCORECARD_TABLES if e in EXPERIMENTS}


def scorecard_flags(wildcards, input):
    return " ".join(f"{e}={input[e]}" for e in scorecard_tables(wildcards))


def figure7_runs():
    """X-Fusion Fig. 7's columns, label -> run: the first x_fuse_dit run and vanilla X-Fusion (an
    x_fuse run of an experiment declaring both, figure8); {} where there is none."""
    for exp in EXPERIMENTS.values():
        dit = [r for r in exp.runs if dit_of(r)]
        vanilla = [r for r in exp.runs if RUNS[r].model.architecture == "x_fuse"]
        if dit and vanilla:
            return {"X-Fusion (Pretrained DiT)": dit[0], "X-Fusion": vanilla[0]}
    return {}


FIGURE7 = figure7_runs()


def final_targets():
    """Every table and figure of the scale, the findings scorecard, and the copies
    results/<experiment>.csv (results/findings.csv)."""
    names = [*EXPERIMENTS, SCORECARD]
    tables = [table_path(e) for e in names]
    figures = [figure_path(e, ext) for e in [*FIGURES, SCORECARD] for ext in ("png", "pdf")]
    if FIGURE7:
        figures += [figure_path("figure7", ext) for ext in ("png", "pdf")]
    return tables + figures + [f"results/{e}.csv" for e in names]


# ---- Supp. B.1 fine-tuning (workflow/rules/finetune.smk) ---------------------------------------

FINETUNE = config.get("finetune", {})
FT_RUN = FINETUNE.get("run", "dual_tower")  # without such a run in config.experiments, no rules


def finetune_init():
    """The step dir fine-tuning starts from: finetune.step, else the run's last eval step."""
    step = FINETUNE.get("step") or last_step(FT_RUN)
    return f"{R}/runs/{FT_RUN}/steps/{step}"


def task_source():
    """Where the task data comes from: the world's scene records, or finetune.task_dir."""
    if FINETUNE.get("task_dir"):
        return f"--folder {FINETUNE['task_dir']}"
    return f"--world {R}/world"


def task_model(stage):
    """The model dir scored at `stage`: the trained run's (before) or the fine-tuned one's."""
    if stage == "before":
        return finetune_init()
    return f"{R}/finetune/{FT_RUN}/steps/{RUNS[FT_RUN].finetune.steps}"
