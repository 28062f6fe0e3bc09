import json
import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq

from hic.provenance import from_job
from hic.runlog import to_log
from hic.speed import speed
from hic.train_clip import TrainSettings, input_identity, train

log = to_log(snakemake.log[0])
inp, out = snakemake.input, snakemake.output
sizes = {
    r["key"]: (r["original_width"], r["original_height"])
    for path in inp.status
    for r in pq.read_table(
        path, columns=["key", "status", "original_width", "original_height"]
    ).to_pylist()
    if r["status"] == "success"
}
# Checkpoints and metrics live beside the outputs, so a killed job resumes from them.
work = Path(out.model).parent / "train"
summary = train(
    [Path(p) for p in inp.tars],
    [Path(p) for p in inp.annotations],
    sizes,
    work,
    TrainSettings(**snakemake.params.settings, **speed(snakemake.config, "clip/defaults")),
    data_id=input_identity([*inp.tars, *inp.status, *inp.annotations], snakemake.params.code),
)
shutil.copy(work / "metrics.jsonl", out.metrics)
shutil.copy(work / "params.txt", out.params)
os.replace(work / "model.pt", out.model)
# Finished: the checkpoint has served its purpose; a later re-run must train anew.
shutil.rmtree(work)
Path(out.provenance).write_text(json.dumps(from_job(snakemake), indent=2, sort_keys=True) + "\n")
log.info("run %s: %s", snakemake.wildcards.run, summary)
