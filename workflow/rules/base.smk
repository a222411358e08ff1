# The frozen base LLM per base name, the tiny-scale judges (evaluators the pipeline trains) and
# the tiny-scale REPA target (an encoder the pipeline trains that no evaluator uses).


rule base_lm:
    """Pretrain the tiny Llama on the world corpus, or record a pretrained one (paper scale)."""
    input:
        corpus_input(),
        mmlu_input(),
        tokenizer=f"{R}/tokenizer",
    output:
        f"{R}/base_lm/{{base}}/base_model.json",
    params:
        py=PY,
        config=CONFIG,
        run=lambda wc: BASE_RUN[wc.base],
        # paths, not inputs, at paper scale (pretrained base, evaluation.mmlu_path)
        corpus=lambda wc: CORPUS,
        mmlu=lambda wc: mmlu_data(),
        out=lambda wc: f"{R}/base_lm/{wc.base}",
        recipe=lambda wc: recipe("base_lm", BASE_RUN[wc.base]),
    conda:
        CONDA_ENV
    log:
        log("base_lm", "{base}"),
    benchmark:
        bench("base_lm", "{base}")
    # Two cores, the pretraining's own intra-op threads (xfusion.pretrain_lm.PRETRAIN_THREADS = 2,
    # pinned whatever OMP_NUM_THREADS this sets, because the thread count changes the weights): the
    # base LM is the critical path of a fresh DAG, when nothing else can run beside it.
    threads: 2
    # Critical path first: the base that most runs wait on pretrains before the others (unranked,
    # a fresh `make demo` started Fig. B's side bases tiny_s and tiny_l, 2 runs waiting on each,
    # before tiny_base, on which the other runs wait).
    priority: lambda wc: sum(base_of(run) == wc.base for run in RUNS)
    shell:
        "{params.py} -m xfusion.pretrain_lm --config {params.config} --run {params.run} --tokenizer {input.tokenizer} --corpus {params.corpus} --mmlu {params.mmlu} --out {params.out} > {log} 2>&1"


if uses_judges():

    rule judges:
        """Train the tiny CLIP and ITM judges (FID features, CLIP score, BLIP-2 ITM stand-ins);
        quality.json reports their accuracy on held-out pairs."""
        input:
            scenes=f"{R}/world/heldout/scenes.jsonl",
            images=f"{R}/world/heldout/images",
            captions=f"{R}/captions/heldout.jsonl",
            # Fit on the train split's pairs (as CLIP never saw COCO val): the held-out pairs
            # the judges score stay unseen by them; their quality is measured on held-out.
            train_scenes=f"{R}/world/train/scenes.jsonl",
            train_captions=f"{R}/captions/train.jsonl",
        output:
            directory(f"{R}/judges"),
        params:
            py=PY,
            config=CONFIG,
            recipe=recipe("judges"),
        conda:
            CONDA_ENV
        log:
            log("judges"),
        benchmark:
            bench("judges")
        shell:
            "{params.py} -m eval.judges --config {params.config} --scenes {input.scenes} --captions {input.captions} --train-scenes {input.train_scenes} --train-captions {input.train_captions} --out {output} > {log} 2>&1"


if uses_align_encoder():

    rule align_encoder:
        """Train the tiny REPA target (a ViT parsing scenes patch by patch) on the world's align
        split only (data.n_align images no evaluator sees); quality.json measures it on align
        images kept out."""
        input:
            scenes=f"{ALIGN_SPLIT}/scenes.jsonl",
            images=f"{ALIGN_SPLIT}/images",
        output:
            directory(ALIGN_ENCODER_DIR),
        params:
            py=PY,
            config=CONFIG,
            recipe=recipe("align_encoder"),
        threads: 1
        conda:
            CONDA_ENV
        log:
            log("align_encoder"),
        benchmark:
            bench("align_encoder")
        shell:
            "{params.py} -m xfusion.align_encoder --config {params.config} --scenes {input.scenes} --out {output} > {log} 2>&1"


rule dit:
    """x_fuse_dit's vision tower: pretrain the tiny text-to-image MMDiT on the world's latents and
    captions (the stand-in for the paper's in-house DiT), or name a pretrained one (paper)."""
    input:
        tokenizer=f"{R}/tokenizer",
        latents=f"{R}/latents/train.safetensors",
        captions=f"{R}/captions/train.jsonl",
    output:
        f"{R}/dit/{{dit}}/dit_model.json",
    params:
        py=PY,
        config=CONFIG,
        run=lambda wc: DIT_RUN[wc.dit],
        out=lambda wc: f"{R}/dit/{wc.dit}",
        recipe=lambda wc: recipe("dit", DIT_RUN[wc.dit]),
    conda:
        CONDA_ENV
    log:
        log("dit", "{dit}"),
    benchmark:
        bench("dit", "{dit}")
    # One thread, as base_lm: the pretraining pins its own (xfusion.pretrain_lm.pin_numerics).
    threads: 1
    shell:
        "{params.py} -m xfusion.pretrain_dit --config {params.config} --run {params.run} --tokenizer {input.tokenizer} --latents {input.latents} --captions {input.captions} --out {params.out} > {log} 2>&1"
