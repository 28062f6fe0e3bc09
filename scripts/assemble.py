from pathlib import Path

from hic.assemble import assemble_shard, code_version
from hic.runlog import to_log

log = to_log(snakemake.log[0])
inp = snakemake.input
summary = assemble_shard(
    Path(inp.status),
    Path(inp.scene),
    Path(inp.regions),
    Path(snakemake.output[0]),
    region_provenance=snakemake.params.provenance,
    code_version=code_version(Path(snakemake.scriptdir).parent),
)
log.info("shard %s: %s", snakemake.wildcards.shard, summary)
