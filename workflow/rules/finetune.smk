# Supp. B.1: a trained run fine-tuned on editing, localisation, in/out-painting and VQA at once,
# scored before and after (figureA). Not among `all`'s targets: `make finetune` asks for
# R/tables/figureA.csv and R/figures/figureA.png (docs/INTERFACES.md, "Downstream tasks").

if FT_RUN in RUNS:

    rule tasks:
        """Downstream task examples (python -m xfusion.data.tasks): from the world's scenes, or
        checked and copied from the user's task folders (finetune.task_dir)."""
        input:
            [] if FINETUNE.get("task_dir") else [f"{R}/world/train/scenes.jsonl", f"{R}/world/heldout/scenes.jsonl"],
        output:
            train=f"{R}/tasks/train/tasks.jsonl",
            heldout=f"{R}/tasks/heldout/tasks.jsonl",
        params:
            py=PY,
            config=CONFIG,
            source=task_source(),
            out=lambda wc, output: str(Path(output.train).parent.parent),
            recipe=recipe("tasks"),
        conda:
            CONDA_ENV
        log:
            log("tasks"),
        benchmark:
            bench("tasks")
        shell:
            "{params.py} -m xfusion.data.tasks --config {params.config} {params.source} --out {params.out} > {log} 2>&1"


    rule finetune_run:
        """Fine-tune finetune.run's step dir on the tasks (python -m xfusion.train --init)."""
        input:
            done(FT_RUN),
            tasks=f"{R}/tasks/train/tasks.jsonl",
        output:
            f"{R}/finetune/{FT_RUN}/done.json",
        params:
            py=PY,
            config=CONFIG,
            init=finetune_init(),
            run=FT_RUN,
            out=lambda wc, output: str(Path(output[0]).parent),
            recipe=recipe("finetune_run", FT_RUN),
        threads: 1
        conda:
            CONDA_ENV
        log:
            log("finetune_run", FT_RUN),
        benchmark:
            bench("finetune_run", FT_RUN)
        shell:
            "{params.py} -m xfusion.train --config {params.config} --run {params.run} --init {params.init} --tasks {input.tasks} --experiment figureA --out {params.out} > {log} 2>&1"


    rule finetune_eval:
        """Per-task scores of the model before or after fine-tuning (python -m eval.tasks);
        outside the fine-tuning run dir, which holds one recipe's files only (xfusion.train)."""
        input:
            lambda wc: judges_input(evaluators(FT_RUN, "clip_model")),
            [ATTRIBUTE_CLASSIFIER] if world_source() else [],
            lambda wc: done(FT_RUN) if wc.stage == "before" else f"{R}/finetune/{FT_RUN}/done.json",
            tasks=f"{R}/tasks/heldout/tasks.jsonl",
        output:
            scores=f"{R}/finetune_scores/{FT_RUN}/{{stage}}.json",
            outputs=directory(f"{R}/finetune_scores/{FT_RUN}/outputs_{{stage}}"),
        wildcard_constraints:
            stage="before|after",
        params:
            py=PY,
            config=CONFIG,
            run=FT_RUN,
            model=lambda wc: task_model(wc.stage),
            classifier=f"--classifier {ATTRIBUTE_CLASSIFIER}" if world_source() else "",
            judges=lambda wc: judges_flag(evaluators(FT_RUN, "clip_model")),
            recipe=recipe("finetune_eval", FT_RUN),
        conda:
            CONDA_ENV
        log:
            log("finetune_eval", "{stage}"),
        benchmark:
            bench("finetune_eval", "{stage}")
        shell:
            "{params.py} -m eval.tasks --config {params.config} --run {params.run} --model {params.model} --tasks {input.tasks} {params.classifier} {params.judges} --outputs {output.outputs} --out {output.scores} > {log} 2>&1"


    rule figure_a:
        """Supp. Fig. A at our scale: per-task metrics before/after and a qualitative panel."""
        input:
            before=f"{R}/finetune_scores/{FT_RUN}/before.json",
            after=f"{R}/finetune_scores/{FT_RUN}/after.json",
            tasks=f"{R}/tasks/heldout/tasks.jsonl",
        output:
            csv=f"{R}/tables/figureA.csv",
            panel=f"{R}/figures/figureA.png",
        params:
            py=PY,
        conda:
            CONDA_ENV
        log:
            log("figure_a"),
        benchmark:
            bench("figure_a")
        shell:
            "{params.py} -m eval.figure_a --before {input.before} --after {input.after} --tasks {input.tasks} --csv {output.csv} --panel {output.panel} > {log} 2>&1"
