import tempfile
from pathlib import Path

from hic.download import DownloadSettings, download_shard
from hic.provenance import stamp_outputs
from hic.runlog import to_log
from hic.speed import speed

# img2dataset starts worker processes with "spawn", which re-imports this file.
if __name__ == "__main__":
    log = to_log(snakemake.log[0])
    out = snakemake.output
    summary = download_shard(
        Path(snakemake.input.urls),
        Path(out.tar),
        Path(out.status),
        Path(out.stats),
        DownloadSettings(**snakemake.params.settings, **speed(snakemake.config, "download")),
        # img2dataset's own shard (as large as the output) is written on the job's local temp
        # disk ($TMPDIR on a cluster node), not next to the output on shared storage.
        work_dir=Path(
            tempfile.mkdtemp(
                prefix=f"hic-download-{snakemake.wildcards.shard}-",
                dir=snakemake.resources.tmpdir,
            )
        ),
    )
    stamp_outputs(snakemake)
    log.info("shard %s: %s", snakemake.wildcards.shard, summary["status"])
