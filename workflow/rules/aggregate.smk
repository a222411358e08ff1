# Tables: one CSV per experiment (ours beside the paper's numbers), from the metric JSONs, under
# the scale's results_dir, and the findings scorecard from those tables; results/<name>.csv is a
# copy of each (common.smk, docstring).


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


rule findings:
    """The findings scorecard from the tables (R/tables/findings.csv and its figure): a row per
    finding of reference/findings.yaml, our effect, its interval, a verdict."""
    input:
        unpack(scorecard_tables),
        findings=FINDINGS,
    output:
        table=report(
            table_path(SCORECARD),
            caption="../report/findings.rst",
            category="Tables",
            labels={"experiment": SCORECARD},
        ),
        png=report(
            figure_path(SCORECARD, "png"),
            caption="../report/findings.rst",
            category="Figures",
            labels={"figure": SCORECARD},
        ),
        pdf=figure_path(SCORECARD, "pdf"),
    params:
        py=PY,
        tables=scorecard_flags,
    conda:
        CONDA_ENV
    log:
        log("findings"),
    benchmark:
        bench("findings")
    shell:
        "{params.py} -m eval.findings --findings {input.findings} --tables {params.tables} --out {output.table} --figures {output.png} {output.pdf} > {log} 2>&1"


rule publish:
    """results/<experiment>.csv: a copy of the table of the scale this config runs (and
    results/findings.csv of its scorecard). The input path names the scale, so running another
    scale remakes the copy (rerun trigger: input)."""
    wildcard_constraints:
        experiment=alternation([*EXPERIMENTS, SCORECARD]),
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
