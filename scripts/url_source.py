import json
from pathlib import Path

from hic.runlog import to_log

log = to_log(snakemake.log[0])
source = json.dumps(snakemake.params.source, indent=2, sort_keys=True) + "\n"
Path(snakemake.output.source).write_text(source)
log.info("URL shards come from: %s", source)
