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
        code=code_version("stats"),
        quantiles=lookup(dpath="stats/quantiles", within=config),
        histogram_bins=lookup(dpath="stats/histogram_bins", within=config),
        top_errors=lookup(dpath="stats/top_errors", within=config),
    log:
        "results/logs/stats.log",
    benchmark:
        "results/benchmarks/stats.tsv"
    conda:
        "../envs/stats.yaml"
    threads: 1
    script:
        "../scripts/stats.py"


rule dataset_stats:
    input:
        summaries=expand("results/dataset_summary/{shard}.parquet", shard=SHARDS),
        release=demo_release(),
        reference=demo_reference(),
        verified=demo_verified(),
    output:
        summary=report("results/stats/dataset_summary.md", caption="../report/dataset_summary.rst", category="Dataset"),
        numbers="results/stats/dataset_summary.json",
        plot=report("results/stats/dataset.png", caption="../report/dataset_plot.rst", category="Dataset"),
        tables=directory("results/stats/dataset_tables"),
    params:
        code=code_version("dataset_stats"),
        quantiles=lookup(dpath="stats/quantiles", within=config),
        top_labels=lookup(dpath="stats/top_labels", within=config),
        region_iou=lookup(dpath="stats/region_iou", within=config),
        colours=demo_colours(),
    log:
        "results/logs/dataset_stats.log",
    benchmark:
        "results/benchmarks/dataset_stats.tsv"
    conda:
        "../envs/stats.yaml"
    threads: 1
    script:
        "../scripts/dataset_stats.py"
