from pathlib import Path

from hic.models import ModelRef
from hic.provenance import stamp_outputs
from hic.refine_regions import refine_rows
from hic.region_tables import REFINED_SCHEMA, check_complete, read_rows, write_rows
from hic.runlog import to_log
from hic.speed import speed
from hic.vlm import make_backend

log = to_log(snakemake.log[0])
inp, params = snakemake.input, snakemake.params
regions = read_rows(Path(inp.regions))
backend = make_backend(
    params.backend,
    ModelRef.from_config(params.model),
    **params.vlm,
    vllm=speed(snakemake.config, "caption_scene")["vllm"],
)
rows = refine_rows(
    regions,
    backend,
    Path(inp.prompt).read_text(),
    **params.settings,
    **speed(snakemake.config, "refine_regions"),
)
check_complete(regions, rows, "refine_regions")
write_rows(rows, REFINED_SCHEMA, Path(snakemake.output[0]))
stamp_outputs(snakemake)
log.info(
    "refined %d regions: %s",
    len(rows),
    {p: sum(r["refine_path"] == p for r in rows) for p in ("llm", "fallback", "failed")},
)
