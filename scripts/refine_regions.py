from pathlib import Path

from hic.provenance import stamp_outputs
from hic.refine_regions import refine_shard
from hic.runlog import to_log
from hic.speed import speed
from hic.threads import use_threads
from hic.vlm import stage_backend

log = to_log(snakemake.log[0])
inp, params = snakemake.input, snakemake.params
use_threads(snakemake.threads)
# Speed settings (engine arguments) are read from the config, not params.
backend, identity = stage_backend(params, snakemake.config)
summary = refine_shard(
    Path(inp.regions),
    Path(snakemake.output[0]),
    backend,
    Path(inp.prompt).read_text(),
    identity,
    # How often progress is saved is not a param: changing it re-runs nothing.
    flush_every=snakemake.config["flush_every"],
    **params.settings,
    **speed(snakemake.config, "refine_regions"),
)
stamp_outputs(snakemake)
log.info("shard %s: %s", snakemake.wildcards.shard, summary)
