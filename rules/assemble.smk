rule assemble:
    input:
        status="results/images/{shard}.parquet",
        scene="results/scene/{shard}.parquet",
        proposals="results/regions/proposals/{shard}.parquet",
        regions="results/regions/refined/{shard}.parquet",
    output:
        release="results/dataset/{shard}.parquet",
        summary="results/dataset_summary/{shard}.parquet",
    params:
        code=code_version("assemble"),
        provenance=region_provenance(),
    log:
        "results/logs/assemble/{shard}.log",
    benchmark:
        "results/benchmarks/assemble/{shard}.tsv"
    conda:
        "../envs/stats.yaml"
    threads: 1
    script:
        "../scripts/assemble.py"


rule dataset_card:
    input:
        summary="results/stats/dataset_summary.json",
    output:
        card=report("results/dataset/README.md", caption="../report/dataset_card.rst", category="Dataset"),
    params:
        code=code_version("dataset_card"),
        models=lookup(dpath="models", within=config),
        provenance=region_provenance(),
    log:
        "results/logs/dataset_card.log",
    benchmark:
        "results/benchmarks/dataset_card.tsv"
    conda:
        "../envs/stats.yaml"
    threads: 1
    script:
        "../scripts/dataset_card.py"
