rule verify_labels:
    input:
        regions="results/regions/selected/{shard}.parquet",
        tar="results/images/{shard}.tar",
        status="results/images/{shard}.parquet",
        verify_prompt="prompts/verify_label.txt",
        correct_prompt="prompts/correct_label.txt",
        things=lookup(dpath="propose_regions/vocabulary/things", within=config),
        stuff=lookup(dpath="propose_regions/vocabulary/stuff", within=config),
        model=model_files("vlm"),
    output:
        regions="results/regions/verified/{shard}.parquet",
    params:
        code=code_version("verify_labels"),
        model=lookup(dpath="models/vlm", within=config),
        backend=lookup(dpath="caption_scene/backend", within=config),
        vlm=vlm_options(),
        settings=science(config, "verify_labels"),
    log:
        "results/logs/verify_labels/{shard}.log",
    benchmark:
        "results/benchmarks/verify_labels/{shard}.tsv"
    conda:
        vlm_env()
    threads: 2
    resources:
        gpu=1,
    script:
        "../scripts/verify_labels.py"
