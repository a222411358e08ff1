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


if FIGURE7:

    rule figure7:
        """X-Fusion Fig. 7: the pretrained DiT alone, X-Fusion (Pretrained DiT) and vanilla
        X-Fusion on the same prompts and images, at each run's last eval step."""
        input:
            dit=lambda wc: dit_input(FIGURE7["X-Fusion (Pretrained DiT)"]),
            tokenizer=f"{R}/tokenizer",
            t2i=[f"{R}/samples/{r}/{last_step(r)}/t2i/index.jsonl" for r in FIGURE7.values()],
            i2t=[f"{R}/samples/{r}/{last_step(r)}/i2t.jsonl" for r in FIGURE7.values()],
        output:
            png=report(figure_path("figure7", "png"), category="Figures",
                       labels={"figure": "figure7"}),
            pdf=figure_path("figure7", "pdf"),
        conda:
            CONDA_ENV
        params:
            py=PY,
            config=CONFIG,
            run=FIGURE7["X-Fusion (Pretrained DiT)"],
            dit=lambda wc: f"{R}/dit/{dit_of(FIGURE7['X-Fusion (Pretrained DiT)'])}",
            samples=" ".join(f'"{label}={R}/samples/{r}/{last_step(r)}"'
                             for label, r in FIGURE7.items()),
            recipe=lambda wc: recipe("sample_t2i", FIGURE7["X-Fusion (Pretrained DiT)"]),
        log:
            log("figure7"),
        benchmark:
            bench("figure7")
        shell:
            "{params.py} -m eval.figure7 --config {params.config} --run {params.run} --dit {params.dit} --tokenizer {input.tokenizer} --samples {params.samples} --out {output.png} {output.pdf} > {log} 2>&1"
