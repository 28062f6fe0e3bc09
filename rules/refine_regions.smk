rule refine_regions:
    input:
        regions="results/regions/captioned/{shard}.parquet",
        prompt="prompts/region_refine.txt",
        model=model_files("vlm"),
    output:
        regions="results/regions/refined/{shard}.parquet",
    params:
        code=code_version("refine_regions"),
        model=lookup(dpath="models/vlm", within=config),
        backend=lookup(dpath="caption_scene/backend", within=config),
        vlm=vlm_options(),
        settings=science(config, "refine_regions"),
    log:
        "results/logs/refine_regions/{shard}.log",
    benchmark:
        "results/benchmarks/refine_regions/{shard}.tsv"
    conda:
        vlm_env()
    threads: 2
    resources:
        gpu=1,
    script:
        "../scripts/refine_regions.py"
