from pathlib import Path

from hic.models import TINY_BUILDERS
from hic.runlog import to_log

log = to_log(snakemake.log[0])
arch = snakemake.wildcards.arch
TINY_BUILDERS[arch](Path(snakemake.output[0]), seed=snakemake.params.seed)
log.info("built tiny random %s in %s", arch, snakemake.output[0])
