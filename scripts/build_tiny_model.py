from pathlib import Path

from hic.methods.flame_tiny import build_tiny_mistral
from hic.runlog import to_log
from hic.segment import build_tiny_sam
from hic.tiny_models import TINY_BUILDERS

log = to_log(snakemake.log[0])
arch = snakemake.wildcards.arch
builders = {**TINY_BUILDERS, "sam": build_tiny_sam, "mistral": build_tiny_mistral}
if arch not in builders:
    raise ValueError(f"no tiny model {arch!r}; the workflow builds {sorted(builders)}")
builders[arch](Path(snakemake.output[0]), seed=snakemake.params.seed)
log.info("built tiny random %s in %s", arch, snakemake.output[0])
