rule caption_regions:
    input:
        regions="results/regions/verified/{shard}.parquet",
        tar="results/images/{shard}.tar",
        status="results/images/{shard}.parquet",
        prompt="prompts/region_caption.txt",
        model=model_files("vlm"),
    output:
        regions="results/regions/captioned/{shard}.parquet",
    params:
        code=code_version("caption_regions"),
        model=lookup(dpath="models/vlm", within=config),
        backend=lookup(dpath="caption_scene/backend", within=config),
        vlm=vlm_options(),
        settings=science(config, "caption_regions"),
    log:
        "results/logs/caption_regions/{shard}.log",
    benchmark:
        "results/benchmarks/caption_regions/{shard}.tsv"
    conda:
        vlm_env()
    threads: 2
    resources:
        gpu=1,
    script:
        "../scripts/caption_regions.py"
