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
        # flush_every only decides how often progress is saved: not a param, so changing it
        # re-captions nothing (the script reads it from the config).
        settings={k: v for k, v in config["caption_scene"].items() if k != "flush_every"},
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
