# Helpers for the rules: shard list, URL lists.
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(workflow.basedir) / "scripts"))
from hic.codebase import code_fingerprint
from hic.demo_world import COLOURS, planned_url_rows
from hic.digests import cached_digest
from snakemake.exceptions import WorkflowError
from hic.shard_urls import count_rows, shard_count, shard_name
from hic.slurm_status import install_if_present
from hic.speed import SPEED, science

# A cancelled or pre-empted SLURM job must read as failed, under sacct as under squeue.
install_if_present()


DEMO_URLS = "results/demo/urls.parquet"

# Jobs never reach the Hugging Face hub or update services: every model comes from a local
# folder or the cache filled beforehand (README, "Models on a cluster"). Jobs inherit this
# process's environment, locally and through SLURM; set HF_HUB_OFFLINE=0 to allow downloads.
for _name, _value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "WANDB_MODE": "disabled",
}.items():
    os.environ.setdefault(_name, _value)


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


#: What each demo model's training reads (train_demo_model): the detector learns the
#: proposal vocabulary's names, the VLM every VLM stage's prompt as the stage asks it.
DEMO_TRAINING_INPUTS = {
    "owlv2": {"things": "data/vocabulary/things.txt", "stuff": "data/vocabulary/stuff.txt"},
    "sam": {},
    "vlm": {
        name: f"prompts/{name}.txt"
        for name in ("scene_short", "scene_long", "verify_label", "correct_label",
                     "region_caption", "region_refine")
    },
}


def demo_training_inputs(wildcards):
    if wildcards.model not in DEMO_TRAINING_INPUTS:
        raise ValueError(
            f"no demo model {wildcards.model!r}: the workflow trains "
            f"{sorted(DEMO_TRAINING_INPUTS)} (resources/models/demo-<name>)"
        )
    return DEMO_TRAINING_INPUTS[wildcards.model]


def vlm_options():
    """Image-size limits and decoding the region stages share with scene captioning (the same
    model, loaded and decoded the same way). vLLM's engine arguments only change speed: the
    scripts read them from the config (hic.speed)."""
    scene = config["caption_scene"]
    decoding = ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty")
    return {
        **{k: scene[k] for k in ("min_pixels", "max_pixels")},
        "decoding": {k: scene[k] for k in decoding},
    }


def vlm_env():
    """The VLM stages' software: vLLM's own pinned environment when it is the backend."""
    vllm = config["caption_scene"]["backend"] == "vllm"
    return "../envs/vlm.yaml" if vllm else "../envs/caption_scene.yaml"


def demo_reference():
    """The demo world's reference annotations, for region recall, when the demo is the input."""
    return ["results/demo/reference.parquet"] if DEMO else []


def demo_colours():
    """The demo world's colour names: dataset_stats finds a reference object's colour in its
    region caption by them."""
    return sorted(COLOURS) if DEMO else []


def demo_release():
    """The release shards, which dataset_stats reads only to score regions against the demo
    world's reference; otherwise it reads the per-shard summaries alone."""
    return expand("results/dataset/{shard}.parquet", shard=SHARDS) if DEMO else []


def demo_verified():
    """The verified region tables, which dataset_stats reads on the demo world only: they keep
    the labels planted deliberately wrong (verify_labels.plant_wrong) that the release drops."""
    return expand("results/regions/verified/{shard}.parquet", shard=SHARDS) if DEMO else []


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
    settings = {k: science(config, k) for k in keys}
    settings["propose_regions"]["settings"] = science(config, "propose_regions/settings")
    return {
        "models": {r: config["models"][r] for r in ("detector", "sam", "vlm")},
        "prompts": prompt_hashes(),
        "settings": settings,
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
# Runs that make a model to benchmark: not LLM2CLIP's first stage, which trains its LLM as a
# caption encoder for the second.
EVALUATED_RUNS = [
    name
    for name, run in CLIP_RUNS.items()
    if ((run or {}).get("options") or {}).get("stage") != "caption_contrastive"
]
EVALUATIONS = expand(
    "results/eval/{run}/{benchmark}.json",
    run=EVALUATED_RUNS,
    benchmark=[*RETRIEVAL, *CLASSIFICATION],
)


def clip_settings(wildcards):
    """A run's training settings: clip.defaults overlaid with the run's own keys, less those
    that only change speed (hic.speed; the script reads them from the config). Keys sorted:
    Snakemake compares params by their text, and a second config file that overrides one
    default reorders the defaults, which would re-run runs whose settings did not change."""
    run = {k: v for k, v in CLIP_RUNS[wildcards.run].items() if k not in ("annotations", "label")}
    merged = {**science(config, "clip/defaults"), **run}
    return {
        k: dict(sorted(v.items())) if isinstance(v, dict) else v
        for k, v in sorted(merged.items())
        if k not in SPEED["clip/defaults"]
    }


def clip_models(wildcards):
    """Workflow outputs a run's method options name: the demo's tiny LLMs (built by
    build_tiny_model) and earlier runs' models (LLM2CLIP's stage 1 for its stage 2)."""
    run = {**config["clip"]["defaults"], **CLIP_RUNS[wildcards.run]}
    options = run.get("options") or {}
    made = ("resources/models/", "results/clip/")
    return [v for v in options.values() if isinstance(v, str) and v.startswith(made)]


def clip_rows():
    """Per run, what the tables need to place it: method, caption policy, annotations, label."""
    keys = ("method", "policy", "annotations", "label")
    return {
        name: {k: v for k, v in {**config["clip"]["defaults"], **run}.items() if k in keys}
        for name, run in CLIP_RUNS.items()
        if name in EVALUATED_RUNS
    }


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


def shard_source():
    """What decides which URLs a shard holds: the URL lists' content (the demo world's list by
    the settings and code that write it), the shard count and shard_urls' settings: the param
    of the url_source stamp that shard_urls and download depend on."""
    if DEMO:
        lists = {"demo_world": config["demo_world"], "code": code_version("demo_world")}
    else:
        cache = Path(".snakemake/hic/url_list_digests.json")
        lists = {p: cached_digest(Path(p), cache) for p in url_lists()}
    return {
        "lists": lists,
        "shards": {**config["shards"], "count": len(SHARDS)},
        "shard_urls": {k: v for k, v in config["shard_urls"].items() if k != "schemes"},
        "schemes": url_schemes(),
    }


def list_inputs():
    """The URL lists as url_source's inputs: a user's lists by content alone (params.source), so
    never by modification time (ancient); the demo world's list is a workflow output, which
    must reach url_source when demo_world re-writes it."""
    return url_lists() if DEMO else ancient(url_lists())


def code_version(script, *extra):
    """What scripts/<script>.py and the library modules it uses do (hic.codebase): a param, so a
    behavioural edit re-runs the stage and its downstream, while a comment, a docstring, a
    fresh checkout or an edit to logging and provenance stamping re-runs nothing. ``extra``:
    hic modules the script loads by name (a run's method)."""
    return code_fingerprint(Path(workflow.basedir) / "scripts" / f"{script}.py", extra)


def method_code(script):
    """code_version of a CLIP stage for one run: the script and the run's method module, so an
    edit to one method re-runs that method's runs only."""

    def version(wildcards):
        run = {**config["clip"]["defaults"], **CLIP_RUNS[wildcards.run]}
        return code_version(script, f"methods.{run.get('method', 'clip')}")

    return version


def demo_model_code(wildcards):
    """code_version of a demo model's training: the script and that model's recipe module."""
    return code_version("train_demo_model", f"demo_training_{wildcards.model}")
