from pathlib import Path

from hic.provenance import stamp_outputs
from hic.region_tables import SELECTED_SCHEMA, image_sizes, read_rows, write_rows
from hic.runlog import to_log
from hic.select_regions import SelectSettings, select

log = to_log(snakemake.log[0])
settings = SelectSettings(**snakemake.params.settings)
sizes = image_sizes(Path(snakemake.input.status))
by_key: dict[str, list[dict]] = {}
for row in read_rows(Path(snakemake.input.proposals)):
    by_key.setdefault(row["key"], []).append(row)
selected = []
for key, proposals in by_key.items():
    size = sizes[key]
    selected += select(proposals, size["original_width"], size["original_height"], settings)
write_rows(selected, SELECTED_SCHEMA, Path(snakemake.output[0]))
stamp_outputs(snakemake)
log.info("selected %d regions in %d images", len(selected), len(by_key))
