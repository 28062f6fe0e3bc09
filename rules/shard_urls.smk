rule shard_urls:
    input:
        lists=url_lists(),
        code=library("shard_urls"),
    output:
        shards=expand("results/urls/{shard}.parquet", shard=SHARDS),
        rejected="results/urls/rejected.parquet",
        summary="results/urls/summary.json",
    params:
        n_shards=len(SHARDS),
        schemes=url_schemes(),
        columns=lookup(dpath="shard_urls/columns", within=config),
    log:
        "results/logs/shard_urls.log",
    benchmark:
        "results/benchmarks/shard_urls.tsv"
    conda:
        "../envs/shard_urls.yaml"
    threads: 2
    script:
        "../scripts/shard_urls.py"
