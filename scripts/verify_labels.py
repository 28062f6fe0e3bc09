from pathlib import Path

from hic.provenance import stamp_outputs
from hic.runlog import to_log
from hic.speed import speed
from hic.threads import use_threads
from hic.verify_labels import VerifySettings, verify_shard
from hic.vlm import stage_backend
from hic.vocabulary import load_vocabulary

log = to_log(snakemake.log[0])
inp, params = snakemake.input, snakemake.params
use_threads(snakemake.threads)
# Speed settings (engine arguments) are read from the config, not params.
backend, identity = stage_backend(params, snakemake.config)
summary = verify_shard(
    Path(inp.regions),
    Path(inp.tar),
    Path(inp.status),
    Path(snakemake.output[0]),
    {
        "verify": Path(inp.verify_prompt).read_text(),
        "correct": Path(inp.correct_prompt).read_text(),
    },
    VerifySettings(**params.settings, **speed(snakemake.config, "verify_labels")),
    backend,
    identity,
    # How often progress is saved is not a param: changing it re-runs nothing.
    flush_every=snakemake.config["flush_every"],
    # Where planted wrong labels come from (verify_labels.plant_wrong).
    vocabulary={"things": load_vocabulary(inp.things), "stuff": load_vocabulary(inp.stuff)},
)
stamp_outputs(snakemake)
log.info("shard %s: %s", snakemake.wildcards.shard, summary)
