# Sampling at each eval step: images from the evaluation prompts (T2I), captions of the evaluation
# images (I2T): the held-out split, or the COCO split (common.smk, EVAL_*).


rule sample_t2i:
    """Generate images for the evaluation prompts with the step's model (resumable)."""
    input:
        done=lambda wc: done(wc.run),
        prompts=EVAL_PROMPTS,
    output:
        f"{R}/samples/{{run}}/{{step}}/t2i/index.jsonl",
    params:
        py=PY,
        config=CONFIG,  # its `evaluation` (sampling steps, CFG) overrides the model dir's own
        model=model_dir,
        out=lambda wc: f"{R}/samples/{wc.run}/{wc.step}/t2i",
        recipe=lambda wc: recipe("sample_t2i", wc.run),
    conda:
        CONDA_ENV
    log:
        log("sample_t2i", "{run}/{step}"),
    benchmark:
        bench("sample_t2i", "{run}/{step}")
    shell:
        "{params.py} -m xfusion.sample --config {params.config} --run {wildcards.run} --model {params.model} --mode t2i --prompts {input.prompts} --out {params.out} > {log} 2>&1"


rule sample_i2t:
    """Caption the evaluation images with the step's model."""
    input:
        done=lambda wc: done(wc.run),
        latents=EVAL_LATENTS,
        captions=EVAL_CAPTIONS,
    output:
        f"{R}/samples/{{run}}/{{step}}/i2t.jsonl",
    params:
        py=PY,
        config=CONFIG,  # its `evaluation` (sampling steps, CFG) overrides the model dir's own
        model=model_dir,
        recipe=lambda wc: recipe("sample_i2t", wc.run),
    conda:
        CONDA_ENV
    log:
        log("sample_i2t", "{run}/{step}"),
    benchmark:
        bench("sample_i2t", "{run}/{step}")
    shell:
        "{params.py} -m xfusion.sample --config {params.config} --run {wildcards.run} --model {params.model} --mode i2t --latents {input.latents} --captions {input.captions} --out {output} > {log} 2>&1"
