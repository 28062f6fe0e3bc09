rule select_regions:
    input:
        proposals="results/regions/proposals/{shard}.parquet",
        status="results/images/{shard}.parquet",
    output:
        regions="results/regions/selected/{shard}.parquet",
    params:
        code=code_version("select_regions"),
        settings=lookup(dpath="select_regions", within=config),
    log:
        "results/logs/select_regions/{shard}.log",
    benchmark:
        "results/benchmarks/select_regions/{shard}.tsv"
    conda:
        "../envs/select_regions.yaml"
    threads: 1
    script:
        "../scripts/select_regions.py"
