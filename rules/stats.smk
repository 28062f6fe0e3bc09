rule stats:
    input:
        status=expand("results/images/{shard}.parquet", shard=SHARDS),
        urls="results/urls/summary.json",
    output:
        status=report("results/stats/download_status.csv", caption="../report/download_status.rst", category="Statistics"),
        errors=report("results/stats/download_errors.csv", caption="../report/download_errors.rst", category="Statistics"),
        image_sizes=report("results/stats/image_sizes.csv", caption="../report/image_sizes.rst", category="Statistics"),
        alt_text_words=report("results/stats/alt_text_words.csv", caption="../report/alt_text_words.rst", category="Statistics"),
        summary=report("results/stats/summary.md", caption="../report/summary.rst", category="Statistics"),
        status_plot=report("results/stats/download_status.png", caption="../report/download_status_plot.rst", category="Statistics"),
        distributions_plot=report("results/stats/distributions.png", caption="../report/distributions.rst", category="Statistics"),
    params:
        stats=lookup(dpath="stats", within=config),
    log:
        "results/logs/stats.log",
    benchmark:
        "results/benchmarks/stats.tsv"
    conda:
        "../envs/stats.yaml"
    threads: 1
    script:
        "../scripts/stats.py"
