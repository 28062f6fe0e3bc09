import json
from pathlib import Path

from hic.runlog import to_log
from hic.stats import download_stats, plot_distributions, plot_status, summary_markdown

log = to_log(snakemake.log[0])
params, out = snakemake.params, snakemake.output
tables = download_stats(
    [Path(p) for p in snakemake.input.status],
    quantiles=params.quantiles,
    top_errors=params.top_errors,
    threads=snakemake.threads,
    memory_mb=snakemake.resources.get("mem_mb"),
)
for name in ["status", "errors", "image_sizes", "alt_text_words"]:
    tables[name].to_csv(out[name], index=False)
urls = json.loads(Path(snakemake.input.urls).read_text())
Path(out.summary).write_text(summary_markdown(tables, urls))
plot_status(tables, Path(out.status_plot))
plot_distributions(tables, Path(out.distributions_plot), params.histogram_bins)
log.info("statistics of %d shards written", len(snakemake.input.status))
