import json
from pathlib import Path

from hic.dataset_stats import (
    against_reference,
    dataset_stats,
    plot_dataset,
    summary_dict,
    summary_markdown,
)
from hic.runlog import to_log

log = to_log(snakemake.log[0])
inp, params, out = snakemake.input, snakemake.params, snakemake.output
summaries = [Path(p) for p in inp.summaries]
tables = dataset_stats(summaries, quantiles=params.quantiles, top_labels=params.top_labels)
if inp.reference:  # the demo world
    tables |= against_reference(
        [Path(p) for p in inp.release],
        Path(inp.reference[0]),
        verified_files=[Path(p) for p in inp.verified],
        iou_threshold=params.region_iou,
        colours=set(params.colours),
    )
folder = Path(out.tables)
folder.mkdir(parents=True, exist_ok=True)
for name, table in tables.items():
    table.to_csv(folder / f"{name}.csv", index=False)
Path(out.summary).write_text(summary_markdown(tables))
Path(out.numbers).write_text(json.dumps(summary_dict(tables), indent=2, sort_keys=True) + "\n")
plot_dataset(tables, Path(out.plot))
log.info("dataset statistics of %d shard summaries written", len(summaries))
