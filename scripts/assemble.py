from pathlib import Path

from hic.assemble import assemble_shard
from hic.provenance import git_describe, stamp_outputs
from hic.runlog import to_log

log = to_log(snakemake.log[0])
inp = snakemake.input
summary = assemble_shard(
    Path(inp.status),
    Path(inp.scene),
    Path(inp.proposals),
    Path(inp.regions),
    Path(snakemake.output.release),
    Path(snakemake.output.summary),
    region_provenance=snakemake.params.provenance,
    code_version=git_describe(Path(snakemake.scriptdir).parent),
)
stamp_outputs(snakemake)
log.info("shard %s: %s", snakemake.wildcards.shard, summary)
