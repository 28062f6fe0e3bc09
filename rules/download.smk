rule download:
    input:
        urls="results/urls/{shard}.parquet",
        code=library("download"),
    output:
        tar="results/images/{shard}.tar",
        status="results/images/{shard}.parquet",
        stats="results/images/{shard}_stats.json",
    params:
        settings=lookup(dpath="download", within=config),
    log:
        "results/logs/download/{shard}.log",
    benchmark:
        "results/benchmarks/download/{shard}.tsv"
    conda:
        "../envs/download.yaml"
    threads: 1
    script:
        "../scripts/download.py"
