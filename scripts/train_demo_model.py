"""Train one demo model (wildcard ``model``) with its recipe module, hic.demo_training_<model>."""

import importlib
from pathlib import Path

from hic.runlog import to_log
from hic.threads import use_threads

log = to_log(snakemake.log[0])
use_threads(snakemake.threads)
model = snakemake.wildcards.model
# Loaded by name, so this job's code version (and the env test) covers only its own recipe.
recipe = importlib.import_module(f"hic.demo_training_{model}")
inputs = {name: Path(path) for name, path in snakemake.input.items()}
summary = recipe.train_demo(
    Path(snakemake.output.model), inputs, seed=snakemake.params.seed, log=log.info
)
log.info("trained demo %s in %.0f s: %s", model, summary["seconds"], snakemake.output.model)
