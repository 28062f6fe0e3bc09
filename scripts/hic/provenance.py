"""What produced a stage's output: its rule, parameters, prompts, code and models.

Every Parquet table a stage writes carries this as the schema metadata key ``hic.provenance``
(JSON), so a shard file found on its own still says which settings, model ids and revisions,
prompt versions and code made it. Models are part of the parameters (``{id, revision}`` or a
local path, as configured); prompts are recorded by content hash and the code by the
behaviour fingerprint every rule passes as its ``code`` param (``hic.codebase``), so two runs
of the same configuration record the same provenance wherever they run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path

import pyarrow.parquet as pq

KEY = b"hic.provenance"


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def git_describe(repo: Path) -> str:
    """``git describe --always --dirty`` of ``repo``, or "unknown" without git or a checkout."""
    git = shutil.which("git")
    if git is None:
        return "unknown"
    proc = subprocess.run(
        [git, "-C", str(repo), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
    )
    return proc.stdout.strip() if proc.returncode == 0 and proc.stdout.strip() else "unknown"


def stage_provenance(
    rule: str,
    params: Mapping[str, object],
    inputs: Mapping[str, Iterable[str]],
    repo: Path,
) -> dict:
    """The record for one job: ``inputs`` maps input names to paths; those named ``*prompt*``
    are prompt files. ``params`` holds the settings, the models and the code fingerprint."""
    prompts = {
        name: file_digest(Path(path))
        for name, paths in sorted(inputs.items())
        if "prompt" in name
        for path in paths
    }
    return {
        "rule": rule,
        "params": dict(params),
        "prompts": prompts,
        "code_version": git_describe(repo),
    }


def from_job(smk) -> dict:
    """``stage_provenance`` of the running Snakemake job (the ``snakemake`` script object)."""
    inputs = {name: _paths(value) for name, value in smk.input.items()}
    return stage_provenance(smk.rule, dict(smk.params.items()), inputs, Path(smk.scriptdir).parent)


def _paths(value) -> list[str]:
    return [value] if isinstance(value, str) else [str(v) for v in value]


def stamp(path: Path, provenance: dict) -> None:
    """Add ``provenance`` to the schema metadata of the Parquet file at ``path``, streaming
    its row groups into a new file (memory stays at one row group) that replaces it whole."""
    source = pq.ParquetFile(path)
    metadata = {**(source.schema_arrow.metadata or {})}
    metadata[KEY] = json.dumps(provenance, sort_keys=True, default=str).encode()
    schema = source.schema_arrow.with_metadata(metadata)
    tmp = path.with_name(path.name + ".stamping")
    with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
        for i in range(source.num_row_groups):
            writer.write_table(source.read_row_group(i).replace_schema_metadata(metadata))
    source.close()
    os.replace(tmp, path)


def stamp_outputs(smk) -> dict:
    """Stamp every Parquet output of the running job with its provenance; returns it."""
    provenance = from_job(smk)
    for output in smk.output:
        for path in _parquet_files(Path(output)):
            stamp(path, provenance)
    return provenance


def _parquet_files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(path.rglob("*.parquet"))
    return [path] if path.suffix == ".parquet" else []


def read_provenance(path: Path) -> dict:
    """The provenance stamped on a Parquet file; KeyError names the file when it has none."""
    metadata = pq.read_schema(path).metadata or {}
    if KEY not in metadata:
        raise KeyError(f"{path} carries no {KEY.decode()} metadata (written before stamping?)")
    return json.loads(metadata[KEY])
