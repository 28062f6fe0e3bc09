rule caption_scene:
    input:
        tar="results/images/{shard}.tar",
        status="results/images/{shard}.parquet",
        short_prompt="prompts/scene_short.txt",
        long_prompt="prompts/scene_long.txt",
        model=model_files("vlm"),
    output:
        scene="results/scene/{shard}.parquet",
    params:
        code=code_version("caption_scene"),
        model=lookup(dpath="models/vlm", within=config),
        # Speed settings (batch and chunk size, engine arguments) are not params: changing
        # one re-captions nothing (hic.speed; the script reads them from the config).
        settings=science(config, "caption_scene"),
    log:
        "results/logs/caption_scene/{shard}.log",
    benchmark:
        "results/benchmarks/caption_scene/{shard}.tsv"
    conda:
        vlm_env()
    threads: 2
    resources:
        gpu=1,
    script:
        "../scripts/caption_scene.py"
