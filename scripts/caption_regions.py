from pathlib import Path

from hic.caption_regions import RegionCaptionSettings, caption_regions_shard
from hic.provenance import stamp_outputs
from hic.runlog import to_log
from hic.speed import speed
from hic.threads import use_threads
from hic.vlm import stage_backend

log = to_log(snakemake.log[0])
inp, params = snakemake.input, snakemake.params
use_threads(snakemake.threads)
# Speed settings (engine arguments) are read from the config, not params.
backend, identity = stage_backend(params, snakemake.config)
summary = caption_regions_shard(
    Path(inp.regions),
    Path(inp.tar),
    Path(inp.status),
    Path(snakemake.output[0]),
    Path(inp.prompt).read_text(),
    RegionCaptionSettings(**params.settings, **speed(snakemake.config, "caption_regions")),
    backend,
    identity,
    # How often progress is saved is not a param: changing it re-runs nothing.
    flush_every=snakemake.config["flush_every"],
)
stamp_outputs(snakemake)
log.info("shard %s: %s", snakemake.wildcards.shard, summary)
