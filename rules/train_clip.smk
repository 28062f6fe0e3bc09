rule train_clip:
    input:
        tars=expand("results/images/{shard}.tar", shard=SHARDS),
        status=expand("results/images/{shard}.parquet", shard=SHARDS),
        annotations=clip_annotations,
        models=clip_models,
    output:
        model="results/clip/{run}/model.pt",
        metrics="results/clip/{run}/metrics.jsonl",
        params="results/clip/{run}/params.txt",
        provenance="results/clip/{run}/provenance.json",
    params:
        code=method_code("train_clip"),
        settings=clip_settings,
    log:
        "results/logs/train_clip/{run}.log",
    benchmark:
        "results/benchmarks/train_clip/{run}.tsv"
    conda:
        "../envs/train_clip.yaml"
    threads: 2
    resources:
        gpu=1,
    script:
        "../scripts/train_clip.py"
