# Training: one job per run, however many experiments share it.
#
# Only done.json is a declared output. The step model dirs (R/runs/RUN/steps/STEP, one per
# training.eval_steps), checkpoints/, train_log.jsonl and mlflow_run_id.txt are written by
# xfusion.train beside it: Snakemake deletes the declared outputs of a failed or rerun job, and
# resuming after a kill needs the checkpoints and the log so far. done.json is written last, so
# downstream rules take it as input and read the step dirs beside it.


rule train_run:
    """Train one variant (python -m xfusion.train); resumes from R/runs/RUN/checkpoints."""
    input:
        lambda wc: judges_input(repa_encoder(wc.run)),
        lambda wc: align_encoder_input(repa_encoder(wc.run)),
        lambda wc: dit_input(wc.run),
        base_lm=lambda wc: f"{R}/base_lm/{base_of(wc.run)}/base_model.json",
        latents=f"{R}/latents/train.safetensors",
        captions=f"{R}/captions/train.jsonl",
    output:
        f"{R}/runs/{{run}}/done.json",
    params:
        py=PY,
        config=CONFIG,
        launch=lambda wc, resources: srun_launcher(resources),
        judges=lambda wc: judges_flag(repa_encoder(wc.run)),
        align_encoder=lambda wc: align_encoder_flag(repa_encoder(wc.run)),
        dit=lambda wc: dit_flag(wc.run),
        out=lambda wc: f"{R}/runs/{wc.run}",
        recipe=lambda wc: recipe("train_run", wc.run),
        # Left out of the recipe (it changes no weight at a step), but it decides which step
        # dirs are written: a change reruns the job, which resumes or retrains to write them.
        eval_steps=lambda wc: eval_steps(wc.run),
    # One thread: tiny-scale matmuls gain little from a second thread, so two runs side by side
    # finish sooner than two runs in a row (measured: a 400-step tiny run takes ~95 s alone).
    # On SLURM the profile's cpus_per_task sets the CPUs.
    threads: 1
    resources:
        # Launcher for multi-GPU training; the slurm profile sets it to "srun" (see there).
        mpi="",
        tasks=1,
    conda:
        CONDA_ENV
    log:
        log("train_run", "{run}"),
    benchmark:
        bench("train_run", "{run}")
    shell:
        "{params.launch} {params.py} -m xfusion.train --config {params.config} --run {wildcards.run} --base-lm {input.base_lm} --latents {input.latents} --captions {input.captions} {params.judges} {params.align_encoder} {params.dit} --out {params.out} > {log} 2>&1"
