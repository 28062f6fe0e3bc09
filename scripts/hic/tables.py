"""Benchmark tables of the long-text CLIP runs: Markdown, LaTeX, CSV and a bar chart.

Evaluation writes one JSON file per (run, benchmark); this module gathers them into a long
frame and lays them out as the HIC-12M paper's main table: rows method × training data (each
method's published numbers on its original data from ``data/reference_results.csv``, then this
workflow's runs: alt-text, reference hierarchical captions, the pipeline's own release), and per
benchmark an I→T and a T→I column (retrieval) or top1/top5 (classification), in percent with one
decimal. The CSV is long (one row per number, every recall), for pandas.

Tables have a row index (method, kind, data), kind being ``published`` or ``run``, and two
column levels (benchmark, direction) or (benchmark, metric); a retrieval table keeps its recall
metric in ``table.attrs["metric"]``.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on cluster nodes
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

DIRECTIONS = {"image_to_text": "I→T", "text_to_image": "T→I"}
RECALLS = ("R@1", "R@5", "R@10")
TOP_K = ("top1", "top5")
RESULT_COLUMNS = ["method", "data", "run", "benchmark", "task", "direction", "metric", "value", "n"]
REFERENCE_COLUMNS = ["method", "data", "benchmark", "direction", "metric", "value", "source"]
KINDS = ("published", "run")
# Row order of methods (hic.methods' names); others follow in order of appearance.
METHOD_ORDER = ("clip", "longclip", "flair", "cosmos", "flame", "llm2clip")
# The paper's benchmarks, in its column order: a published number's column exists even when
# no run was evaluated on it (the demo), so the table keeps the paper's layout.
BENCHMARK_ORDER = ("dci", "urban1k", "sharegpt4v_1k", "sharegpt4v_10k", "imagenet")
REQUIRED_KEYS = ("run", "benchmark", "task", "n")

_TEX_ESCAPES = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "→": r"$\rightarrow$",
}


class ResultError(ValueError):
    """An evaluation result or reference file that cannot be used; the message names it."""


def _fraction(path: Path, field: str, value: object) -> float:
    # Recalls and accuracies are fractions; a percent here would silently scale a column by 100.
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ResultError(f"{path}: {field} must be a fraction in [0, 1], got {value!r}")
    return float(value)


def _result_rows(path: Path, result: object) -> list[dict]:
    if not isinstance(result, dict):
        raise ResultError(f"{path}: expected a JSON object, got {type(result).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in result]
    if missing:
        raise ResultError(f"{path}: missing key(s) {missing}")
    base = {k: result[k] for k in REQUIRED_KEYS}
    if result["task"] == "retrieval":
        rows = []
        for key, direction in DIRECTIONS.items():
            scores = result.get(key)
            if not isinstance(scores, dict) or any(m not in scores for m in RECALLS):
                raise ResultError(f"{path}: {key!r} must hold {list(RECALLS)}")
            rows += [
                {
                    **base,
                    "direction": direction,
                    "metric": m,
                    "value": _fraction(path, f"{key}.{m}", scores[m]),
                }
                for m in RECALLS
            ]
        return rows
    if result["task"] == "classification":
        return [
            {**base, "direction": "", "metric": m, "value": _fraction(path, m, result.get(m))}
            for m in TOP_K
        ]
    raise ResultError(
        f"{path}: unknown task {result['task']!r}; expected retrieval or classification"
    )


def run_rows(runs: dict[str, dict]) -> dict[str, tuple[str, str]]:
    """Run name -> (method, training data label) from the config's run entries (settings with
    ``method``, ``policy``, ``annotations`` and an optional ``label``). Two runs of one method
    on the same data label would share a table row: an error naming them."""
    rows: dict[str, tuple[str, str]] = {}
    for name, run in runs.items():
        source = run.get("annotations")
        source = {"reference": "reference", "dataset": "this pipeline"}.get(source, "annotations")
        if run.get("label"):
            data = run["label"]
        elif run.get("policy", "hierarchical") == "alt":
            data = "alt-text"
        elif run.get("policy", "hierarchical") == "hierarchical":
            data = f"HIC captions ({source})"
        else:
            data = f"{run['policy']} captions ({source})"
        row = (run.get("method", "clip"), data)
        twin = next((n for n, r in rows.items() if r == row), None)
        if twin is not None:
            raise ValueError(
                f"runs {twin!r} and {name!r} are both method {row[0]!r} on {row[1]!r}: "
                f"give one a `label` in clip.runs"
            )
        rows[name] = row
    return rows


def load_results(paths: Iterable[Path], runs: dict[str, tuple[str, str]] | None = None):
    """Long frame (``RESULT_COLUMNS``) of evaluation JSON files; values stay fractions.

    ``runs`` (``run_rows``) names each run's method and training data; a run it lacks is
    shown as its own name, with the method its result records.

    A file that is not valid JSON, lacks a key or holds a non-fraction score raises
    ``ResultError`` naming it, as does a second file for the same run and benchmark.
    """
    runs = runs or {}
    rows: list[dict] = []
    seen: dict[tuple[str, str], Path] = {}
    for path in map(Path, paths):
        try:
            result = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ResultError(f"{path}: not valid JSON ({e})") from e
        file_rows = _result_rows(path, result)
        pair = (result["run"], result["benchmark"])
        if pair in seen:
            raise ResultError(f"{path}: run {pair[0]!r} on {pair[1]!r} is also in {seen[pair]}")
        seen[pair] = path
        method = (result.get("model") or {}).get("method", "clip")
        method, data = runs.get(result["run"], (method, result["run"]))
        rows += [{**row, "method": method, "data": data} for row in file_rows]
    return pd.DataFrame(rows, columns=RESULT_COLUMNS)


def load_reference(path: Path) -> pd.DataFrame:
    """Published numbers (``REFERENCE_COLUMNS``, value in percent as printed in the source).

    Lines starting with '#' are comments. Every row must name its source; retrieval rows have
    direction I→T or T→I, classification rows leave it empty.
    """
    lines = [line for line in Path(path).read_text().splitlines(True) if not line.startswith("#")]
    ref = pd.read_csv(io.StringIO("".join(lines)), dtype=str, keep_default_na=False)
    missing = [c for c in REFERENCE_COLUMNS if c not in ref.columns]
    if missing:
        raise ResultError(f"{path}: missing column(s) {missing}")
    ref = ref[REFERENCE_COLUMNS].apply(lambda col: col.str.strip())
    uncited = ref.loc[ref["source"] == "", "method"].tolist()
    if uncited:
        raise ResultError(f"{path}: rows without a source for {uncited}")
    bad = ~ref["direction"].isin(["", *DIRECTIONS.values()])
    if bad.any():
        raise ResultError(
            f"{path}: direction must be I→T, T→I or empty, got {ref['direction'][bad].tolist()}"
        )
    ref["value"] = pd.to_numeric(ref["value"], errors="coerce").astype(float)
    out_of_range = ~ref["value"].between(0, 100)
    if out_of_range.any():
        raise ResultError(
            f"{path}: value must be a percentage in [0, 100] "
            f"(rows of {ref.loc[out_of_range, 'method'].tolist()})"
        )
    if ref.duplicated(["method", "data", "benchmark", "direction", "metric"]).any():
        raise ResultError(f"{path}: a method/data/benchmark/direction/metric appears twice")
    return ref


def _order(present: Iterable[str], wanted: list[str] | None, what: str) -> list[str]:
    """``wanted`` (a selection, in that order) or every value in order of first appearance."""
    seen = list(dict.fromkeys(present))
    if wanted is None:
        return seen
    unknown = [w for w in wanted if w not in seen]
    if unknown:
        raise ValueError(f"no results for {what}(s) {unknown}; have {seen}")
    return list(wanted)


def _rows(frame: pd.DataFrame, kind: str) -> pd.DataFrame:
    return frame.assign(kind=kind).set_index(["method", "kind", "data"])


def _table(
    results: pd.DataFrame,
    key: str,
    subcolumns: Iterable[str],
    benchmarks: list[str] | None,
    reference: pd.DataFrame | None,
) -> pd.DataFrame:
    reference = reference if reference is not None else pd.DataFrame(columns=REFERENCE_COLUMNS)
    published = [b for b in BENCHMARK_ORDER if b in set(reference["benchmark"])]
    benchmarks = _order([*results["benchmark"], *published], benchmarks, "benchmark")
    reference = reference[reference["benchmark"].isin(benchmarks)]
    columns = pd.MultiIndex.from_product([benchmarks, list(subcolumns)], names=["benchmark", key])
    cells = _rows(results.assign(value=results["value"] * 100), "run")
    if not reference.empty:
        cells = pd.concat([cells, _rows(reference, "published")])
    wide = cells.pivot_table(
        index=cells.index.names, columns=["benchmark", key], values="value", aggfunc="first"
    )
    methods = list(dict.fromkeys([*results["method"], *reference["method"]]))
    methods = [m for m in METHOD_ORDER if m in methods] + [
        m for m in methods if m not in METHOD_ORDER
    ]
    order = [
        (method, kind, data)
        for method in methods
        for kind, frame in (("published", reference), ("run", results))
        for data in dict.fromkeys(frame.loc[frame["method"] == method, "data"])
    ]
    return (
        wide.reindex(index=pd.MultiIndex.from_tuples(order, names=wide.index.names))
        .reindex(columns=columns)
        .round(1)
    )


def retrieval_table(
    results: pd.DataFrame,
    *,
    benchmarks: list[str] | None = None,
    recall: str = "R@1",
    reference: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Recall@K in percent: rows (method, kind, data), columns (benchmark, I→T/T→I).

    ``benchmarks`` selects and orders columns (default: the runs' in order of first
    appearance, then the paper's that have published numbers); per method, its ``reference``
    rows (from ``load_reference``) go above its runs.
    """
    if recall not in RECALLS:
        raise ValueError(f"recall must be one of {list(RECALLS)}, got {recall!r}")
    scores = results[(results["task"] == "retrieval") & (results["metric"] == recall)]
    if scores.empty:
        raise ValueError("no retrieval results")
    if reference is not None:
        reference = reference[reference["direction"].isin(DIRECTIONS.values())]
        reference = reference[reference["metric"] == recall]
    table = _table(scores, "direction", DIRECTIONS.values(), benchmarks, reference)
    table.attrs["metric"] = recall
    return table


def classification_table(
    results: pd.DataFrame,
    *,
    benchmarks: list[str] | None = None,
    reference: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Top-1/top-5 accuracy in percent: rows (method, kind, data), columns (benchmark,
    top1/top5)."""
    scores = results[results["task"] == "classification"]
    if scores.empty:
        raise ValueError("no classification results")
    if reference is not None:
        reference = reference[(reference["direction"] == "") & reference["metric"].isin(TOP_K)]
    return _table(scores, "metric", TOP_K, benchmarks, reference)


def row_label(kind: str, data: str) -> str:
    return f"{data} (published)" if kind == "published" else data


def to_markdown(table: pd.DataFrame) -> str:
    """Method, training data, then one column per benchmark and direction (or metric)."""
    flat = table.copy()
    flat.columns = [" ".join(col) for col in table.columns]
    flat.index = pd.MultiIndex.from_tuples(
        [(m, row_label(k, d)) for m, k, d in table.index], names=["method", "training data"]
    )
    flat = flat.reset_index()
    # tabulate only treats None as missing; NaN would print as "nan".
    flat = flat.astype(object).where(flat.notna(), None)
    return flat.to_markdown(index=False, floatfmt=".1f", missingval="–")


def long_csv(results: pd.DataFrame, reference: pd.DataFrame | None, task: str) -> pd.DataFrame:
    """Every number of a task, runs and published, one per row (percent; every recall)."""
    runs = results[results["task"] == task].assign(
        kind="run", value=lambda f: (f["value"] * 100).round(2), source=""
    )
    frames = [runs]
    if reference is not None:
        wanted = (
            reference["direction"] != "" if task == "retrieval" else reference["direction"] == ""
        )
        frames.append(reference[wanted].assign(kind="published", run="", n=pd.NA, task=task))
    columns = ["method", "kind", "data", "run", "benchmark", "direction", "metric", "value"]
    return pd.concat(frames)[[*columns, "n", "source"]].reset_index(drop=True)


def _tex(text: object) -> str:
    return "".join(_TEX_ESCAPES.get(c, c) for c in str(text))


def _tex_cell(value: float, best: float | None) -> str:
    if pd.isna(value):
        return "--"
    return rf"\textbf{{{value:.1f}}}" if value == best else f"{value:.1f}"


def to_latex(table: pd.DataFrame, caption: str, label: str) -> str:
    """A booktabs table; per column the best run is bold (references never are)."""
    spans = table.columns.get_level_values(0).value_counts(sort=False)
    header, rules, start = ["", _tex(table.attrs.get("metric", ""))], [], 3
    for benchmark, width in spans.items():
        header.append(rf"\multicolumn{{{width}}}{{c}}{{{_tex(benchmark)}}}")
        rules.append(rf"\cmidrule(lr){{{start}-{start + width - 1}}}")
        start += width
    runs = table.index.get_level_values("kind") == "run"
    best = table[runs].max()
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        rf"\caption{{{caption}}}",
        rf"\label{{{label}}}",
        rf"\begin{{tabular}}{{ll{'c' * len(table.columns)}}}",
        r"\toprule",
        " & ".join(header) + r" \\",
        " ".join(rules),
        " & ".join(["Method", "Data", *(_tex(c) for c in table.columns.get_level_values(1))])
        + r" \\",
    ]
    for method in dict.fromkeys(table.index.get_level_values("method")):
        lines.append(r"\midrule")  # one block per method, as in the paper
        for (kind, data), values in table.loc[method].iterrows():
            cells = [
                _tex_cell(v, best[col] if kind == "run" else None) for col, v in values.items()
            ]
            lines.append(" & ".join([_tex(method), _tex(row_label(kind, data)), *cells]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def plot_retrieval(table: pd.DataFrame, path: Path) -> None:
    """Grouped bars: one group per benchmark and direction, one bar per row with a number
    there (published numbers hatched)."""
    table = table.dropna(axis=1, how="all")
    labels = ["\n".join(col) for col in table.columns]
    x = np.arange(len(labels))
    width = 0.8 / len(table)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(labels) + 2), 4), layout="constrained")
    for i, ((method, kind, data), values) in enumerate(table.iterrows()):
        ax.bar(
            x + (i - (len(table) - 1) / 2) * width,
            values.to_numpy(dtype=float),
            width,
            label=f"{method}, {row_label(kind, data)}",
            hatch="//" if kind == "published" else None,
        )
    ax.set_xticks(x, labels)
    ax.set_ylabel(f"{table.attrs.get('metric', 'recall')} (%)")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_message(path: Path, message: str) -> None:
    """A figure that only says why there is nothing to plot (the report still has its file)."""
    fig, ax = plt.subplots(figsize=(6, 1.5))
    ax.axis("off")
    ax.text(0.5, 0.5, message, ha="center", va="center")
    fig.savefig(path, dpi=100)
    plt.close(fig)
