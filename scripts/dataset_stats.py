import json
from pathlib import Path

from hic.dataset_stats import (
    dataset_stats,
    plot_dataset,
    region_recall,
    summary_dict,
    summary_markdown,
)
from hic.runlog import to_log

log = to_log(snakemake.log[0])
params, out = snakemake.params, snakemake.output
files = [Path(p) for p in snakemake.input.release]
tables = dataset_stats(files, quantiles=params.quantiles, top_labels=params.top_labels)
if snakemake.input.reference:
    tables["region_recall"] = region_recall(
        files, Path(snakemake.input.reference[0]), params.region_iou
    )
folder = Path(out.tables)
folder.mkdir(parents=True, exist_ok=True)
for name, table in tables.items():
    table.to_csv(folder / f"{name}.csv", index=False)
Path(out.summary).write_text(summary_markdown(tables))
Path(out.numbers).write_text(json.dumps(summary_dict(tables), indent=2, sort_keys=True) + "\n")
plot_dataset(tables, Path(out.plot))
log.info("dataset statistics of %d shards written", len(files))
