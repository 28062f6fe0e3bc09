from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config.yaml"


validate(config, "schemas/config.schema.yaml")


include: "rules/common.smk"


wildcard_constraints:
    shard=r"\d{5}",



include: "rules/demo_world.smk"
include: "rules/shard_urls.smk"
include: "rules/download.smk"
include: "rules/stats.smk"


rule all:
    input:
        rules.stats.output,


localrules:
    all,
