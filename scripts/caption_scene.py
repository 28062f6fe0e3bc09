from pathlib import Path

from hic.caption_scene import CaptionSettings, caption_shard
from hic.models import ModelRef
from hic.provenance import stamp_outputs
from hic.runlog import to_log
from hic.vlm import make_backend

log = to_log(snakemake.log[0])
settings = CaptionSettings(**snakemake.params.settings)
model = snakemake.params.model
backend = make_backend(
    settings.backend,
    ModelRef.from_config(model),
    min_pixels=settings.min_pixels,
    max_pixels=settings.max_pixels,
    do_sample=settings.do_sample,
    temperature=settings.temperature,
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
