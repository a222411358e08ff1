# Data stage: images + scene records, long captions, tokenizer, latents (docs/INTERFACES.md).


if world_source():

    rule world:
        """Generate the tiny image-caption world, its text corpus and its MMLU-format benchmark."""
        output:
            train=f"{R}/world/train/scenes.jsonl",
            heldout=f"{R}/world/heldout/scenes.jsonl",
            train_images=directory(f"{R}/world/train/images"),
            heldout_images=directory(f"{R}/world/heldout/images"),
            corpus=f"{R}/world/corpus.txt",
            mmlu=directory(f"{R}/world/mmlu"),
            **align_split_outputs(),
        params:
            py=PY,
            config=CONFIG,
            out=lambda wc, output: str(Path(output.train).parent.parent),
            recipe=recipe("world"),
        conda:
            CONDA_ENV
        log:
            log("world"),
        benchmark:
            bench("world")
        shell:
            "{params.py} -m xfusion.data.world --config {params.config} --out {params.out} > {log} 2>&1"

else:

    rule folder:
        """Center-crop and resize data.image_dir into the train/heldout splits."""
        output:
            train=f"{R}/world/train/scenes.jsonl",
            heldout=f"{R}/world/heldout/scenes.jsonl",
            train_images=directory(f"{R}/world/train/images"),
            heldout_images=directory(f"{R}/world/heldout/images"),
        params:
            py=PY,
            config=CONFIG,
            out=lambda wc, output: str(Path(output.train).parent.parent),
            recipe=recipe("folder"),
        conda:
            CONDA_ENV
        log:
            log("folder"),
        benchmark:
            bench("folder")
        shell:
            "{params.py} -m xfusion.data.folder --config {params.config} --out {params.out} > {log} 2>&1"


if coco_eval():

    rule coco:
        """The COCO evaluation split: a seeded sample of evaluation.n_samples annotated images,
        centre-cropped and resized, one human caption each as the T2I prompt; overlap with the
        training images reported (xfusion.data.coco)."""
        input:
            coco_train_input(),
            annotations=config["data"]["eval"]["coco_annotations"],
            images=config["data"]["eval"]["coco_images"],
        output:
            scenes=f"{R}/world/coco/scenes.jsonl",
            images=directory(f"{R}/world/coco/images"),
            prompts=f"{R}/world/coco/prompts.jsonl",
            overlap=f"{R}/world/coco/overlap.json",
        params:
            py=PY,
            config=CONFIG,
            train=lambda wc: coco_train_images(),
            out=lambda wc, output: str(Path(output.scenes).parent),
            recipe=recipe("coco"),
        conda:
            CONDA_ENV
        log:
            log("coco"),
        benchmark:
            bench("coco")
        shell:
            "{params.py} -m xfusion.data.coco --config {params.config} --train {params.train} --out {params.out} > {log} 2>&1"


# The sharded data stage (xfusion.shards): captioning and encoding run as one job per shard of
# data.captioner.shard_size images, the shard count of each split computed from the config at
# parse time (data.n_train, data.n_heldout; evaluation.n_samples for coco), so a dry run lists
# every shard job; each split's shards are gathered into R/captions/<split>.jsonl and
# R/latents/<split>.safetensors, which every downstream rule reads as before. A killed run
# reruns only the shards without output.


rule caption:
    """Long captions of one shard of a split (the InternVL step; the scene record at tiny scale)."""
    input:
        scenes=f"{R}/world/{{split}}/scenes.jsonl",
        images=f"{R}/world/{{split}}/images",
    output:
        captions=caption_shard("{split}", "{shard}"),
        report=f"{R}/captions/shards/{{split}}/{{shard}}.bad_inputs.json",
    wildcard_constraints:
        shard=r"\d{6}",
    params:
        py=PY,
        config=CONFIG,
        of=lambda wc: len(split_shards(wc.split)),
        recipe=recipe("caption"),
    conda:
        CONDA_ENV
    log:
        log("caption", "{split}/{shard}"),
    benchmark:
        bench("caption", "{split}/{shard}")
    shell:
        "{params.py} -m xfusion.caption --config {params.config} --scenes {input.scenes} --shard {wildcards.shard} --of {params.of} --out {output.captions} > {log} 2>&1"


rule caption_gather:
    """A split's caption shards, in order, as one file; their bad-input reports summed."""
    input:
        unpack(lambda wc: shard_files(caption_shard, wc.split)),
    output:
        captions=f"{R}/captions/{{split}}.jsonl",
        report=f"{R}/captions/{{split}}.bad_inputs.json",
    params:
        py=PY,
        recipe=recipe("caption_gather"),
    conda:
        CONDA_ENV
    log:
        log("caption_gather", "{split}"),
    benchmark:
        bench("caption_gather", "{split}")
    shell:
        "{params.py} -m xfusion.gather captions --shards {input.shards} --out {output.captions} > {log} 2>&1"


rule tokenizer:
    """Train the tiny tokenizer (or save the base LLM's own at paper scale)."""
    input:
        corpus_input(),
        captions=f"{R}/captions/train.jsonl",
    output:
        directory(f"{R}/tokenizer"),
    params:
        py=PY,
        config=CONFIG,
        corpus=lambda wc: CORPUS,  # a path, not an input, at paper scale
        recipe=recipe("tokenizer"),
    conda:
        CONDA_ENV
    log:
        log("tokenizer"),
    benchmark:
        bench("tokenizer")
    shell:
        "{params.py} -m xfusion.tokenizer --config {params.config} --corpus {params.corpus} --captions {input.captions} --out {output} > {log} 2>&1"


rule latents:
    """Encode one shard of a split with the image codec once; every run trains on these latents."""
    input:
        captions=caption_shard("{split}", "{shard}"),
        images=f"{R}/world/{{split}}/images",
    output:
        latents=latents_shard("{split}", "{shard}"),
        report=f"{R}/latents/shards/{{split}}/{{shard}}.bad_inputs.json",
    wildcard_constraints:
        shard=r"\d{6}",
    params:
        py=PY,
        config=CONFIG,
        recipe=recipe("latents"),
    conda:
        CONDA_ENV
    log:
        log("latents", "{split}/{shard}"),
    benchmark:
        bench("latents", "{split}/{shard}")
    shell:
        "{params.py} -m xfusion.latents --config {params.config} --captions {input.captions} --allow-empty --out {output.latents} > {log} 2>&1"


rule latents_gather:
    """A split's latent shards, in order, as one file; their bad-input reports summed."""
    input:
        unpack(lambda wc: shard_files(latents_shard, wc.split)),
    output:
        latents=f"{R}/latents/{{split}}.safetensors",
        report=f"{R}/latents/{{split}}.bad_inputs.json",
    params:
        py=PY,
        recipe=recipe("latents_gather"),
    conda:
        CONDA_ENV
    log:
        log("latents_gather", "{split}"),
    benchmark:
        bench("latents_gather", "{split}")
    shell:
        "{params.py} -m xfusion.gather latents --shards {input.shards} --out {output.latents} > {log} 2>&1"


# The linear probe's labelled images (Supp. C.3: ImageNet): data.probe.{train,val}_dir in
# ImageFolder layout, or the tiny world's own set (rule probe_world) where those are null.
if world_source():

    rule probe_world:
        """The world's train / held-out images by shape, as the probe's ImageFolder splits."""
        input:
            train=f"{R}/world/train/scenes.jsonl",
            heldout=f"{R}/world/heldout/scenes.jsonl",
        output:
            train=directory(f"{WORLD_PROBE}/train"),
            val=directory(f"{WORLD_PROBE}/val"),
        params:
            py=PY,
            out=lambda wc, output: str(Path(output.train).parent),
            recipe=recipe("probe_world"),
        conda:
            CONDA_ENV
        log:
            log("probe_world"),
        benchmark:
            bench("probe_world")
        shell:
            "{params.py} -m xfusion.data.world_probe --train-scenes {input.train} --val-scenes {input.heldout} --out {params.out} > {log} 2>&1"


rule probe_data:
    """Centre-crop, resize and encode one probe split with the image codec, labels beside."""
    input:
        lambda wc: probe_images_input(wc.probe_split),
    output:
        f"{R}/probe/{{probe_split}}.safetensors",
    params:
        py=PY,
        config=CONFIG,
        images=lambda wc: probe_images(wc.probe_split),
        recipe=recipe("probe_data"),
    wildcard_constraints:
        probe_split="|".join(PROBE_SPLITS),
    conda:
        CONDA_ENV
    log:
        log("probe_data", "{probe_split}"),
    benchmark:
        bench("probe_data", "{probe_split}")
    shell:
        "{params.py} -m xfusion.probe_data --config {params.config} --images {params.images} --out {output} > {log} 2>&1"

