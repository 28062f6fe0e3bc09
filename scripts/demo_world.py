import json
from pathlib import Path

from hic.demo_world import write_world
from hic.provenance import stamp_outputs
from hic.runlog import to_log
from hic.url_keys import url_key

log = to_log(snakemake.log[0])
world = snakemake.params.world
summary = write_world(
    Path(snakemake.output.urls).parent,
    n_images=world["n_images"],
    n_benchmark_pairs=world["n_benchmark_pairs"],
    width=world["width"],
    height=world["height"],
    seed=world["seed"],
    objects_per_image=tuple(world["objects_per_image"]),
    n_broken=world["broken"],
    classify_per_class=world["classify_per_class"],
    url_key=url_key,
)
Path(snakemake.output.summary).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
stamp_outputs(snakemake)
log.info("demo world: %s", summary)
