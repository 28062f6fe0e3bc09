import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from hic.provenance import from_job
from hic.runlog import to_log
from hic.speed import speed
from hic.train_clip import TrainSettings, input_identity, pair_shards, train, write_job

log = to_log(snakemake.log[0])
inp, out = snakemake.input, snakemake.output
tars = [Path(p) for p in inp.tars]
# The pipeline's own release has one file per image shard, named alike: a shard reads its own.
own_release = [t.parent.parent / "dataset" / f"{t.stem}.parquet" for t in tars]
shards = pair_shards(
    tars, inp.annotations, aligned=[Path(a) for a in inp.annotations] == own_release
)
# Speed settings (checkpoint_every) are read from the config, not params (hic.speed).
settings = TrainSettings(**snakemake.params.settings, **speed(snakemake.config, "clip/defaults"))
# Checkpoints and metrics live beside the outputs, so a killed job resumes from them.
work = Path(out.model).parent / "train"
work.mkdir(parents=True, exist_ok=True)
ranks = max(1, int(snakemake.resources.get("gpu", 0) or 0))  # one process per GPU
# Each rank's share of the job's cores: one trains (one torch thread: more threads than free
# cores only spin), the others decode in DataLoader workers.
job = {
    # The models a method's options name (LLM2CLIP's stage 1) are data too: a retrained one
    # must not be resumed over.
    "data_id": input_identity(
        [*inp.tars, *inp.status, *inp.annotations, *inp.models], snakemake.params.code
    ),
    "workers": max(1, snakemake.threads // ranks) - 1,
}
if ranks > 1:  # as open_clip_train runs: torchrun, DDP
    write_job(work / "job.json", shards, work, settings, **job)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += [f"--nproc_per_node={ranks}", "-m", "hic.train_clip", str(work / "job.json")]
    subprocess.run(command, env=env, check=True)
    summary = json.loads((work / "summary.json").read_text())
else:
    torch.set_num_threads(1)
    summary = train(shards, work, settings, **job)
shutil.copy(work / "metrics.jsonl", out.metrics)
shutil.copy(work / "params.txt", out.params)
os.replace(work / "model.pt", out.model)
# Finished: the checkpoint has served its purpose; a later re-run must train anew.
shutil.rmtree(work)
Path(out.provenance).write_text(json.dumps(from_job(snakemake), indent=2, sort_keys=True) + "\n")
log.info("run %s: %s", snakemake.wildcards.run, summary)
