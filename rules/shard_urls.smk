# What the URL shards are made from: the lists' content and the sharding settings. Written
# only when that identity changes, so a touched or re-copied list, or a behavioural edit to
# shard_urls' code, re-crawls nothing, while an edited list or new shard settings re-shard and
# re-download in the same run (README, "Re-running").
rule url_source:
    input:
        lists=list_inputs(),
    output:
        source="results/urls/source.json",
    params:
        source=shard_source(),
    log:
        "results/logs/url_source.log",
    benchmark:
        "results/benchmarks/url_source.tsv"
    conda:
        "../envs/shard_urls.yaml"
    threads: 1
    script:
        "../scripts/url_source.py"


rule shard_urls:
    input:
        # By content (the url_source stamp), not by modification time.
        lists=ancient(url_lists()),
        source=rules.url_source.output.source,
    output:
        shards=expand("results/urls/{shard}.parquet", shard=SHARDS),
        rejected="results/urls/rejected.parquet",
        summary="results/urls/summary.json",
    params:
        code=code_version("shard_urls"),
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
