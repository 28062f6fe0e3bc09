# Helpers for the rules: shard list, URL lists.
import sys
from pathlib import Path

sys.path.insert(0, str(Path(workflow.basedir) / "scripts"))
from hic.codebase import imports
from hic.demo_world import planned_url_rows
from snakemake.exceptions import WorkflowError
from hic.shard_urls import count_rows, shard_count, shard_name


DEMO_URLS = "results/demo/urls.parquet"


def url_lists():
    """config url_list as a list (--config url_list=a.parquet gives a string)."""
    lists = config["url_list"]
    return [lists] if isinstance(lists, str) else list(lists)


def n_shards():
    """Shard count, fixed when the DAG is built (see hic.shard_urls)."""
    if config["shards"]["count"]:
        return config["shards"]["count"]
    size = config["shards"]["size"]
    if url_lists() == [DEMO_URLS]:  # planned, so the count is the same before and after
        world = config["demo_world"]
        return shard_count(planned_url_rows(world["n_images"], world["broken"]), size)
    missing = [p for p in url_lists() if not Path(p).exists()]
    if missing:
        raise WorkflowError(
            f"url_list {missing} not found. Fix the path, or set shards.count to build "
            "the workflow before the lists exist."
        )
    return shard_count(sum(count_rows(Path(p)) for p in url_lists()), size)


SHARDS = [shard_name(i) for i in range(n_shards())]


def model_files(role):
    """A model the workflow builds itself (a tiny one under resources/) is an input of its
    users; a hub id with a revision is a param only, read from the Hugging Face cache."""
    model_id = config["models"][role]["id"]
    return [model_id] if model_id.startswith("resources/models/") else []


def vlm_options():
    """Image-size limits, decoding and vLLM engine arguments the region stages share with
    scene captioning (the same model, loaded and decoded the same way)."""
    scene = config["caption_scene"]
    decoding = ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty")
    return {
        **{k: scene[k] for k in ("min_pixels", "max_pixels", "vllm")},
        "decoding": {k: scene[k] for k in decoding},
    }


def vlm_env():
    """The VLM stages' software: vLLM's own pinned environment when it is the backend."""
    vllm = config["caption_scene"]["backend"] == "vllm"
    return "../envs/vlm.yaml" if vllm else "../envs/caption_scene.yaml"


def demo_reference():
    """The demo world's reference annotations, for region recall, when the demo is the input."""
    return ["results/demo/reference.parquet"] if DEMO else []


def demo_release():
    """The release shards, which dataset_stats reads only to score regions against the demo
    world's reference; otherwise it reads the per-shard summaries alone."""
    return expand("results/dataset/{shard}.parquet", shard=SHARDS) if DEMO else []


def prompt_hashes():
    """Hashes of the region stages' prompt files (their text is a rule input too)."""
    import hashlib

    names = ["verify_label", "correct_label", "region_caption", "region_refine"]
    return {
        n: hashlib.sha256(Path(f"prompts/{n}.txt").read_bytes()).hexdigest()[:16] for n in names
    }


def region_provenance():
    """What produced the regions: models and revisions, prompts, settings."""
    keys = ["propose_regions", "select_regions", "verify_labels", "caption_regions",
            "refine_regions"]
    return {
        "models": {r: config["models"][r] for r in ("detector", "sam", "vlm")},
        "prompts": prompt_hashes(),
        "settings": {k: config[k] for k in keys},
    }


def enabled(section):
    """Entries of a config mapping that are not switched off with null."""
    return {name: spec for name, spec in section.items() if spec is not None}


def from_demo(spec):
    """An entry that needs the demo world: its reference annotations or its benchmarks."""
    return spec.get("annotations") == "reference" or spec.get("path", "").startswith("results/demo/")


# With another URL list the demo world's runs and benchmarks make no sense: they drop out.
DEMO = url_lists() == [DEMO_URLS]


def url_schemes():
    """shard_urls.schemes, plus file: for the demo world's own list (its images are local
    files). A real list never gets file: unless the config names it: a URL list from the web
    must not make the workflow read this machine's files."""
    schemes = list(config["shard_urls"]["schemes"])
    return schemes + ["file"] if DEMO and "file" not in schemes else schemes

CLIP_RUNS = {n: s for n, s in enabled(config["clip"]["runs"]).items() if DEMO or not from_demo(s)}
RETRIEVAL = {
    n: s for n, s in enabled(config["benchmarks"]["retrieval"]).items() if DEMO or not from_demo(s)
}
CLASSIFICATION = {
    n: s
    for n, s in enabled(config["benchmarks"]["classification"]).items()
    if DEMO or not from_demo(s)
}
EVALUATIONS = expand(
    "results/eval/{run}/{benchmark}.json",
    run=CLIP_RUNS,
    benchmark=[*RETRIEVAL, *CLASSIFICATION],
)


def clip_settings(wildcards):
    """A run's training settings: clip.defaults overlaid with the run's own keys."""
    run = {k: v for k, v in CLIP_RUNS[wildcards.run].items() if k != "annotations"}
    return {**config["clip"]["defaults"], **run}


def clip_annotations(wildcards):
    """Annotation files of a run: the demo world's reference (released annotations), the
    pipeline's assembled dataset, or a list of HIC-format files."""
    source = CLIP_RUNS[wildcards.run]["annotations"]
    if source == "reference":
        return ["results/demo/reference.parquet"]
    if source == "dataset":
        return expand("results/dataset/{shard}.parquet", shard=SHARDS)
    return list(source)


def benchmark_spec(wildcards):
    name = wildcards.benchmark
    if name in RETRIEVAL:
        return {"task": "retrieval", **RETRIEVAL[name]}
    return {"task": "classification", **CLASSIFICATION[name]}


def benchmark_files(wildcards):
    """A benchmark the workflow makes (the demo world's) is an input; others are read from
    their configured path, so a missing one fails with its expected layout."""
    path = benchmark_spec(wildcards)["path"]
    return [path] if path.startswith("results/demo/") else []


def library(stage):
    """The library modules a stage's script imports, directly or through each other.

    Snakemake's code trigger sees only the script itself; as inputs, these make an edit to
    scripts/hic/<name>.py re-run exactly the stages that use it."""
    modules, _ = imports(Path(workflow.basedir) / "scripts" / f"{stage}.py")
    return [str(m.relative_to(workflow.basedir)) for m in modules]
