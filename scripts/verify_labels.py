from pathlib import Path

from hic.models import ModelRef
from hic.provenance import stamp_outputs
from hic.region_images import region_views
from hic.region_tables import VERIFIED_SCHEMA, check_complete, image_sizes, read_rows, write_rows
from hic.runlog import to_log
from hic.speed import speed
from hic.verify_labels import VerifySettings, verify_regions
from hic.vlm import make_backend

log = to_log(snakemake.log[0])
inp, params = snakemake.input, snakemake.params
settings = VerifySettings(**params.settings, **speed(snakemake.config, "verify_labels"))
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
prompts = {
    "verify": Path(inp.verify_prompt).read_text(),
    "correct": Path(inp.correct_prompt).read_text(),
}
rows = verify_regions(views, backend, prompts, settings)
check_complete(regions, rows, "verify_labels")
write_rows(rows, VERIFIED_SCHEMA, Path(snakemake.output[0]))
stamp_outputs(snakemake)
log.info(
    "verified %d regions: %s",
    len(rows),
    {v: sum(r["verdict"] == v for r in rows) for v in ("accurate", "corrected", "unparsed")},
)
