# X-Fusion ablations as one DAG: data -> base LLM -> train -> sample -> eval -> tables -> figures.
#   snakemake --cores 2 results/table1.csv            tiny scale (config/tiny.yaml), laptop CPU
#   snakemake --profile slurm results/table1.csv      paper scale (config/paper.yaml), SLURM GPUs
# Tables and figures are per scale, under the config's results_dir R: R/tables/<experiment>.csv,
# R/figures/<experiment>.{png,pdf}; results/<experiment>.csv is a copy of the table of the scale
# run (rule publish), remade when another scale runs (workflow/rules/common.smk, docstring).
# Paths and command lines: docs/INTERFACES.md. Rules: workflow/rules/<stage>.smk.

# A --configfile on the command line (or in a profile) replaces the default instead of being
# merged into it: tiny keys must not leak into a paper-scale run.
if not workflow.overwrite_configfiles:

    configfile: "config/tiny.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/base.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/sample.smk"
include: "workflow/rules/eval.smk"
include: "workflow/rules/aggregate.smk"
include: "workflow/rules/plots.smk"
include: "workflow/rules/finetune.smk"


report: "workflow/report/workflow.rst"


localrules:
    all,
    aggregate,
    findings,
    publish,
    plot,


rule all:
    input:
        final_targets(),
    default_target: True
