rule download:
    input:
        # ancient: a re-run of shard_urls alone (its code changed) does not re-crawl; a change
        # of what the shards are made from reaches download through the url_source stamp.
        urls=ancient("results/urls/{shard}.parquet"),
        source=rules.url_source.output.source,
    output:
        tar="results/images/{shard}.tar",
        status="results/images/{shard}.parquet",
        stats="results/images/{shard}_stats.json",
    params:
        code=code_version("download"),
        settings=science(config, "download"),
    log:
        "results/logs/download/{shard}.log",
    benchmark:
        "results/benchmarks/download/{shard}.tsv"
    conda:
        "../envs/download.yaml"
    threads: 1
    script:
        "../scripts/download.py"
