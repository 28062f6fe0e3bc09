import json
from pathlib import Path

import torch

from hic.benchmarks import load_benchmark, load_imagefolder
from hic.evaluate_clip import evaluate_classification, evaluate_retrieval, load_run
from hic.provenance import from_job
from hic.runlog import to_log
from hic.threads import use_threads

log = to_log(snakemake.log[0])
use_threads(snakemake.threads)
spec, name = dict(snakemake.params.spec), snakemake.wildcards.benchmark
device = "cuda" if torch.cuda.is_available() else "cpu"  # the rule asks for a GPU
model, method, settings = load_run(Path(snakemake.input.model), device)
if spec.pop("task") == "retrieval":
    data = load_benchmark(name, spec)
    result = (
        {"task": "retrieval", "skipped": f"optional benchmark not found at {spec['path']}"}
        if data is None
        else evaluate_retrieval(model, method, data)
    )
else:
    data = load_imagefolder(spec["path"], name=name, classnames=spec.get("classnames", "folders"))
    result = evaluate_classification(model, method, data)
result = {
    "run": snakemake.wildcards.run,
    "benchmark": name,
    **result,
    "model": settings,
    "provenance": from_job(snakemake),
}
Path(snakemake.output[0]).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
log.info(
    "%s on %s: %s",
    snakemake.wildcards.run,
    name,
    {k: v for k, v in result.items() if k not in ("model", "protocol", "provenance")},
)
