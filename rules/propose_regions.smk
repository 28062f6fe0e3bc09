rule propose_regions:
    input:
        tar="results/images/{shard}.tar",
        status="results/images/{shard}.parquet",
        scene="results/scene/{shard}.parquet",
        things=lookup(dpath="propose_regions/vocabulary/things", within=config),
        stuff=lookup(dpath="propose_regions/vocabulary/stuff", within=config),
        detector=model_files("detector"),
        sam=model_files("sam"),
    output:
        regions="results/regions/proposals/{shard}.parquet",
    params:
        code=code_version("propose_regions"),
        detector=lookup(dpath="models/detector", within=config),
        sam=lookup(dpath="models/sam", within=config),
        settings=science(config, "propose_regions/settings"),
    log:
        "results/logs/propose_regions/{shard}.log",
    benchmark:
        "results/benchmarks/propose_regions/{shard}.tsv"
    conda:
        "../envs/propose_regions.yaml"
    threads: 2
    resources:
        gpu=1,
    script:
        "../scripts/propose_regions.py"
