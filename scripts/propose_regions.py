from pathlib import Path

from hic.models import ModelRef
from hic.parts import model_identity
from hic.propose_regions import Detector, ProposeSettings, propose_shard
from hic.provenance import stamp_outputs
from hic.runlog import to_log
from hic.segment import load_sam
from hic.speed import speed
from hic.threads import use_threads
from hic.vocabulary import load_vocabulary

log = to_log(snakemake.log[0])
inp, params = snakemake.input, snakemake.params
use_threads(snakemake.threads)
summary = propose_shard(
    Path(inp.tar),
    Path(inp.status),
    Path(inp.scene),
    Path(snakemake.output[0]),
    {"things": load_vocabulary(inp.things), "stuff": load_vocabulary(inp.stuff)},
    Detector(ModelRef.from_config(params.detector)),
    load_sam(
        ModelRef.from_config(params.sam),
        **{k: params.sam[k] for k in ("checkpoint", "variant") if params.sam.get(k)},
    ),
    ProposeSettings(**params.settings, **speed(snakemake.config, "propose_regions/settings")),
    {"detector": model_identity(params.detector), "sam": model_identity(params.sam)},
    # How often progress is saved is not a param: changing it re-runs nothing.
    flush_every=snakemake.config["flush_every"],
)
stamp_outputs(snakemake)
log.info("shard %s: %s", snakemake.wildcards.shard, summary)
