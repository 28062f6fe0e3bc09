from pathlib import Path

from hic.provenance import stamp_outputs
from hic.runlog import to_log
from hic.shard_urls import shard_url_lists, write_summary

log = to_log(snakemake.log[0])
summary = shard_url_lists(
    [Path(p) for p in snakemake.input.lists],
    Path(snakemake.output.summary).parent,
    snakemake.params.n_shards,
    schemes=snakemake.params.schemes,
    columns=snakemake.params.columns,
    temp_dir=Path(snakemake.resources.tmpdir) / "hic_shard_urls",
    threads=snakemake.threads,
    memory_mb=snakemake.resources.get("mem_mb"),
)
write_summary(summary, Path(snakemake.output.summary))
stamp_outputs(snakemake)
log.info(
    "sharded %s of %s rows; rejected %s",
    summary["sharded_rows"],
    summary["input_rows"],
    summary["rejected"],
)
