from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config.yaml"


validate(config, "schemas/config.schema.yaml")


include: "rules/common.smk"


wildcard_constraints:
    shard=r"\d{5}",
    arch=r"[a-z0-9_]+",
    model=r"[a-z0-9_]+",



include: "rules/demo_world.smk"
include: "rules/shard_urls.smk"
include: "rules/download.smk"
include: "rules/build_models.smk"
include: "rules/train_demo_model.smk"
include: "rules/caption_scene.smk"
include: "rules/propose_regions.smk"
include: "rules/select_regions.smk"
include: "rules/verify_labels.smk"
include: "rules/caption_regions.smk"
include: "rules/refine_regions.smk"
include: "rules/assemble.smk"
include: "rules/train_clip.smk"
include: "rules/evaluate.smk"
include: "rules/stats.smk"


rule all:
    input:
        rules.stats.output,
        rules.dataset_stats.output,
        rules.dataset_card.output,
        rules.tables.output,


localrules:
    all,
    url_source,
