# Tables: one CSV per experiment (ours beside the paper's numbers), from the metric JSONs.


rule aggregate:
    """Collect an experiment's metric files into results/<experiment>.csv."""
    input:
        unpack(aggregate_inputs),
        reference=REFERENCE,
    output:
        report(
            "results/{experiment}.csv",
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
