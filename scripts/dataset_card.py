import json
from pathlib import Path

from hic.assemble import dataset_card
from hic.runlog import to_log

log = to_log(snakemake.log[0])
summary = json.loads(Path(snakemake.input.summary).read_text())
models = {role: ref for role, ref in snakemake.params.models.items() if isinstance(ref, dict)}
config = {"models": models, "provenance": snakemake.params.provenance}
Path(snakemake.output[0]).write_text(dataset_card(summary, config))
log.info("dataset card written")
