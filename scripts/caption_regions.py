from pathlib import Path

from hic.caption_regions import RegionCaptionSettings, caption_regions
from hic.models import ModelRef
from hic.provenance import stamp_outputs
from hic.region_images import region_views
from hic.region_tables import CAPTIONED_SCHEMA, check_complete, image_sizes, read_rows, write_rows
from hic.runlog import to_log
from hic.speed import speed
from hic.vlm import make_backend

log = to_log(snakemake.log[0])
inp, params = snakemake.input, snakemake.params
settings = RegionCaptionSettings(**params.settings, **speed(snakemake.config, "caption_regions"))
regions = read_rows(Path(inp.regions))
backend = make_backend(
    params.backend,
    ModelRef.from_config(params.model),
    **params.vlm,
    vllm=speed(snakemake.config, "caption_scene")["vllm"],
)
views = region_views(
    Path(inp.tar), regions, image_sizes(Path(inp.status)), settings.box_colour, settings.box_width
)
rows = caption_regions(views, backend, Path(inp.prompt).read_text(), settings)
check_complete(regions, rows, "caption_regions")
write_rows(rows, CAPTIONED_SCHEMA, Path(snakemake.output[0]))
stamp_outputs(snakemake)
log.info("captioned %d regions, %d ok", len(rows), sum(r["caption_status"] == "ok" for r in rows))
