rule evaluate:
    input:
        model="results/clip/{run}/model.pt",
        data=benchmark_files,
        models=clip_models,
    output:
        result="results/eval/{run}/{benchmark}.json",
    params:
        code=method_code("evaluate"),
        spec=benchmark_spec,
    log:
        "results/logs/evaluate/{run}/{benchmark}.log",
    benchmark:
        "results/benchmarks/evaluate/{run}/{benchmark}.tsv"
    conda:
        "../envs/train_clip.yaml"
    threads: 2
    resources:
        gpu=1,
    script:
        "../scripts/evaluate.py"


rule tables:
    input:
        results=EVALUATIONS,
        # Published numbers: an input, so an edited CSV re-renders the tables.
        reference=[config["tables"]["reference"]] if config["tables"]["reference"] else [],
    output:
        retrieval_md=report("results/tables/retrieval.md", caption="../report/retrieval.rst", category="Benchmarks"),
        retrieval_tex="results/tables/retrieval.tex",
        retrieval_csv="results/tables/retrieval.csv",
        classification_md=report("results/tables/classification.md", caption="../report/classification.rst", category="Benchmarks"),
        classification_tex="results/tables/classification.tex",
        classification_csv="results/tables/classification.csv",
        plot=report("results/tables/retrieval.png", caption="../report/retrieval_plot.rst", category="Benchmarks"),
    params:
        code=code_version("tables"),
        runs=clip_rows(),
    log:
        "results/logs/tables.log",
    benchmark:
        "results/benchmarks/tables.tsv"
    conda:
        "../envs/stats.yaml"
    threads: 1
    script:
        "../scripts/tables.py"
