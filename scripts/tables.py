import json
from pathlib import Path

from hic.runlog import to_log
from hic.tables import (
    classification_table,
    load_reference,
    load_results,
    long_csv,
    plot_message,
    plot_retrieval,
    retrieval_table,
    run_rows,
    to_latex,
    to_markdown,
)

log = to_log(snakemake.log[0])
out, params = snakemake.output, snakemake.params
results = [Path(p) for p in snakemake.input.results]
# An optional benchmark that was not found leaves a "skipped" result: listed, not tabled.
skipped = [p for p in results if "skipped" in json.loads(p.read_text())]
for path in skipped:
    log.warning("not in the tables: %s (%s)", path, json.loads(path.read_text())["skipped"])
kept = [p for p in results if p not in skipped]
data = load_results(kept, run_rows(dict(params.runs))) if kept else None
reference = (
    load_reference(Path(snakemake.input.reference[0])) if snakemake.input.reference else None
)
tasks = set(data["task"]) if data is not None else set()
retrieval = (
    retrieval_table(data[data["task"] == "retrieval"], reference=reference)
    if "retrieval" in tasks
    else None
)
classification = (
    classification_table(data[data["task"] == "classification"], reference=reference)
    if "classification" in tasks
    else None
)
skipped_tasks = {json.loads(p.read_text())["task"] for p in skipped}


def absent(task: str) -> str:
    if task in skipped_tasks:
        return f"No results: every {task} benchmark was optional and not found (see the log).\n"
    return f"No {task} benchmark is configured.\n"


for task, table, md, tex, csv, title, label in [
    (
        "retrieval",
        retrieval,
        out.retrieval_md,
        out.retrieval_tex,
        out.retrieval_csv,
        "Long-text retrieval, Recall@1 (%)",
        "tab:retrieval",
    ),
    (
        "classification",
        classification,
        out.classification_md,
        out.classification_tex,
        out.classification_csv,
        "Zero-shot classification accuracy (%)",
        "tab:classification",
    ),
]:
    if table is None:
        for path in (md, tex, csv):
            Path(path).write_text(absent(task))
        continue
    Path(md).write_text(f"# {title}\n\n{to_markdown(table)}\n")
    Path(tex).write_text(to_latex(table, title, label))
    long_csv(data, reference, task).to_csv(csv, index=False)
if retrieval is not None:
    plot_retrieval(retrieval, Path(out.plot))
else:
    plot_message(Path(out.plot), absent("retrieval").strip())
log.info("tables of %d results (%d skipped)", len(results) - len(skipped), len(skipped))
