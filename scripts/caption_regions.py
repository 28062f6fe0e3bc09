from pathlib import Path

from hic.caption_regions import RegionCaptionSettings, caption_regions_shard
from hic.models import ModelRef
from hic.parts import model_identity
from hic.provenance import stamp_outputs
from hic.runlog import to_log
from hic.speed import speed
from hic.threads import use_threads
from hic.vlm import make_backend

log = to_log(snakemake.log[0])
inp, params = snakemake.input, snakemake.params
use_threads(snakemake.threads)
# Speed settings are read from the config, not params (hic.speed).
backend = make_backend(
    params.backend,
    ModelRef.from_config(params.model),
    **params.vlm,
    vllm=speed(snakemake.config, "caption_scene")["vllm"],
)
summary = caption_regions_shard(
    Path(inp.regions),
    Path(inp.tar),
    Path(inp.status),
    Path(snakemake.output[0]),
    Path(inp.prompt).read_text(),
    RegionCaptionSettings(**params.settings, **speed(snakemake.config, "caption_regions")),
    backend,
    {"model": model_identity(params.model), "backend": params.backend, "vlm": params.vlm},
    # How often progress is saved is not a param: changing it re-runs nothing.
    flush_every=snakemake.config["flush_every"],
)
stamp_outputs(snakemake)
log.info("shard %s: %s", snakemake.wildcards.shard, summary)
