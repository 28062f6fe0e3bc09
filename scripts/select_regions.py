from pathlib import Path

from hic.provenance import stamp_outputs
from hic.runlog import to_log
from hic.select_regions import SelectSettings, select_shard

log = to_log(snakemake.log[0])
inp = snakemake.input
summary = select_shard(
    Path(inp.proposals),
    Path(inp.status),
    Path(snakemake.output[0]),
    SelectSettings(**snakemake.params.settings),
)
stamp_outputs(snakemake)
log.info("selected %d regions in %d images", summary["regions"], summary["images"])
