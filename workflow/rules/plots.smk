# Figures: drawn from an experiment's CSV, the paper's findings as subtitle / numbers beside ours,
# under the scale's results_dir (R/figures/<experiment>.{png,pdf}); the findings scorecard's
# figure is drawn by its own rule (aggregate.smk, rule findings).


rule plot:
    """Draw R/figures/<experiment>.png and .pdf with matplotlib."""
    wildcard_constraints:
        experiment=alternation(FIGURES),
    input:
        table=table_path("{experiment}"),
        reference=REFERENCE,
    output:
        png=report(
            figure_path("{experiment}", "png"),
            caption="../report/figure.rst",
            category="Figures",
            labels={"figure": "{experiment}"},
        ),
        pdf=figure_path("{experiment}", "pdf"),
    conda:
        CONDA_ENV
    params:
        py=PY,
        config=CONFIG,
        recipe=experiment_params,
    log:
        log("plot", "{experiment}"),
    benchmark:
        bench("plot", "{experiment}")
    shell:
        "{params.py} -m eval.plots --config {params.config} --experiment {wildcards.experiment} --table {input.table} --reference {input.reference} --out {output.png} {output.pdf} > {log} 2>&1"
