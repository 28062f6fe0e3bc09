rule build_tiny_model:
    input:
    output:
        model=directory("resources/models/tiny-{arch}"),
    params:
        code=code_version("build_tiny_model"),
        seed=lookup(dpath="models/tiny_seed", within=config),
    log:
        "results/logs/build_tiny_model/{arch}.log",
    benchmark:
        "results/benchmarks/build_tiny_model/{arch}.tsv"
    conda:
        "../envs/build_models.yaml"
    threads: 1
    script:
        "../scripts/build_tiny_model.py"
