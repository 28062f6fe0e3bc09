from pathlib import Path

from hic.caption_scene import CaptionSettings, caption_shard
from hic.models import ModelRef
from hic.provenance import stamp_outputs
from hic.runlog import to_log
from hic.speed import speed
from hic.threads import use_threads
from hic.vlm import make_backend

log = to_log(snakemake.log[0])
use_threads(snakemake.threads)
settings = CaptionSettings(**snakemake.params.settings, **speed(snakemake.config, "caption_scene"))
model = snakemake.params.model
backend = make_backend(
    settings.backend,
    ModelRef.from_config(model),
    min_pixels=settings.min_pixels,
    max_pixels=settings.max_pixels,
    decoding=settings.decoding(),
    batch_size=settings.batch_size,
    vllm=settings.vllm,
)
inp = snakemake.input
summary = caption_shard(
    Path(inp.tar),
    Path(inp.status),
    Path(snakemake.output[0]),
    {"short": Path(inp.short_prompt).read_text(), "long": Path(inp.long_prompt).read_text()},
    settings,
    backend,
    model,
    # How often progress is saved is not a param: changing it re-runs nothing.
    flush_every=snakemake.config["flush_every"],
)
stamp_outputs(snakemake)
log.info("shard %s: %s", snakemake.wildcards.shard, summary)
