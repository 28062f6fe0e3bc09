rule demo_world:
    input:
    output:
        urls=DEMO_URLS,
        reference="results/demo/reference.parquet",
        images=directory("results/demo/images"),
        broken=directory("results/demo/broken"),
        benchmark=directory("results/demo/benchmark"),
        classify=directory("results/demo/classify"),
        summary="results/demo/summary.json",
    params:
        code=code_version("demo_world"),
        world=lookup(dpath="demo_world", within=config),
    log:
        "results/logs/demo_world.log",
    benchmark:
        "results/benchmarks/demo_world.tsv"
    conda:
        "../envs/demo_world.yaml"
    threads: 1
    script:
        "../scripts/demo_world.py"
