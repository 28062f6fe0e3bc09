rule caption_scene:
    input:
        tar="results/images/{shard}.tar",
        status="results/images/{shard}.parquet",
        short_prompt="prompts/scene_short.txt",
        long_prompt="prompts/scene_long.txt",
        model=model_files("vlm"),
        code=library("caption_scene"),
    output:
        scene="results/scene/{shard}.parquet",
    params:
        model=lookup(dpath="models/vlm", within=config),
        settings=lookup(dpath="caption_scene", within=config),
    log:
        "results/logs/caption_scene/{shard}.log",
    benchmark:
        "results/benchmarks/caption_scene/{shard}.tsv"
    conda:
        "../envs/caption_scene.yaml"
    threads: 2
    resources:
        gpu=1,
    script:
        "../scripts/caption_scene.py"
