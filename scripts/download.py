from pathlib import Path

from hic.download import DownloadSettings, download_shard
from hic.provenance import stamp_outputs
from hic.runlog import to_log

# img2dataset starts worker processes with "spawn", which re-imports this file.
if __name__ == "__main__":
    log = to_log(snakemake.log[0])
    out = snakemake.output
    summary = download_shard(
        Path(snakemake.input.urls),
        Path(out.tar),
        Path(out.status),
        Path(out.stats),
        DownloadSettings(**snakemake.params.settings),
        work_dir=Path(out.tar).with_suffix(".work"),
    )
    stamp_outputs(snakemake)
    log.info("shard %s: %s", snakemake.wildcards.shard, summary["status"])
