# The demo's models trained on the demo world (hic.demo_training_<model>): the embedded default
# uses them, so every stage decides with real signal. Each is one single-threaded job; a model's
# code version covers its own recipe module only, so editing one recipe retrains that model.
rule train_demo_model:
    input:
        unpack(demo_training_inputs),
    output:
        model=directory("resources/models/demo-{model}"),
    params:
        code=demo_model_code,
        seed=lookup(dpath="models/tiny_seed", within=config),
    log:
        "results/logs/train_demo_model/{model}.log",
    benchmark:
        "results/benchmarks/train_demo_model/{model}.tsv"
    conda:
        "../envs/train_demo_model.yaml"
    threads: 1
    script:
        "../scripts/train_demo_model.py"
