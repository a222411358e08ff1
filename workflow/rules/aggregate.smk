# Tables: one CSV per experiment (ours beside the paper's numbers), from the metric JSONs, under
# the scale's results_dir; results/<experiment>.csv is a copy of it (common.smk, docstring).


rule aggregate:
    """Collect an experiment's metric files into R/tables/<experiment>.csv."""
    input:
        unpack(aggregate_inputs),
        reference=REFERENCE,
    output:
        report(
            table_path("{experiment}"),
            caption="../report/table.rst",
            category="Tables",
            labels={"experiment": "{experiment}"},
        ),
    params:
        py=PY,
        config=CONFIG,
        paths=aggregate_flags,
        recipe=experiment_params,
    conda:
        CONDA_ENV
    log:
        log("aggregate", "{experiment}"),
    benchmark:
        bench("aggregate", "{experiment}")
    shell:
        "{params.py} -m eval.aggregate --config {params.config} --experiment {wildcards.experiment} --reference {input.reference} {params.paths} --out {output} > {log} 2>&1"


rule publish:
    """results/<experiment>.csv: a copy of the table of the scale this config runs. The input
    path names the scale, so running another scale remakes the copy (rerun trigger: input)."""
    input:
        table_path("{experiment}"),
    output:
        "results/{experiment}.csv",
    conda:
        CONDA_ENV
    log:
        log("publish", "{experiment}"),
    benchmark:
        bench("publish", "{experiment}")
    shell:
        "cp {input} {output} > {log} 2>&1"
