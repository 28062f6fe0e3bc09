"""Benchmark tables of the long-text CLIP runs: Markdown, LaTeX, CSV and a bar chart.

Evaluation writes one JSON file per (run, benchmark); this module gathers them into a long
frame and lays them out as in long-text CLIP papers: one row per model, and per benchmark an
I→T and a T→I column (retrieval) or top1/top5 (classification), in percent with one decimal.
Published numbers from ``data/reference_results.csv`` can sit above our runs for comparison.

Tables have a row index (kind, model), kind being ``reference`` or ``run``, and two column
levels (benchmark, direction) or (benchmark, metric); a retrieval table keeps its recall metric
in ``table.attrs["metric"]``.
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
RESULT_COLUMNS = ["run", "benchmark", "task", "direction", "metric", "value", "n"]
REFERENCE_COLUMNS = ["model", "benchmark", "direction", "metric", "value", "source"]
KINDS = ("reference", "run")
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


def load_results(paths: Iterable[Path]) -> pd.DataFrame:
    """Long frame (``RESULT_COLUMNS``) of evaluation JSON files; values stay fractions.

    A file that is not valid JSON, lacks a key or holds a non-fraction score raises
    ``ResultError`` naming it, as does a second file for the same run and benchmark.
    """
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
        rows += file_rows
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
    uncited = ref.loc[ref["source"] == "", "model"].tolist()
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
            f"(rows of {ref.loc[out_of_range, 'model'].tolist()})"
        )
    if ref.duplicated(["model", "benchmark", "direction", "metric"]).any():
        raise ResultError(f"{path}: a model/benchmark/direction/metric appears twice")
    return ref


def _order(present: pd.Series, wanted: list[str] | None, what: str) -> list[str]:
    """``wanted`` (a selection, in that order) or every value in order of first appearance."""
    seen = list(dict.fromkeys(present))
    if wanted is None:
        return seen
    unknown = [w for w in wanted if w not in seen]
    if unknown:
        raise ValueError(f"no results for {what}(s) {unknown}; have {seen}")
    return list(wanted)


def _grid(
    long: pd.DataFrame, name: str, key: str, rows: list[str], columns: pd.MultiIndex, scale: float
) -> pd.DataFrame:
    """Percent cells of ``long`` on a fixed grid of rows and columns."""
    wide = long.pivot(index=name, columns=["benchmark", key], values="value") * scale
    return wide.reindex(index=rows, columns=columns).round(1)


def _table(
    results: pd.DataFrame,
    key: str,
    subcolumns: Iterable[str],
    benchmarks: list[str] | None,
    run_order: list[str] | None,
    reference: pd.DataFrame | None,
) -> pd.DataFrame:
    benchmarks = _order(results["benchmark"], benchmarks, "benchmark")
    runs = _order(results["run"], run_order, "run")
    columns = pd.MultiIndex.from_product([benchmarks, list(subcolumns)], names=["benchmark", key])
    parts = {"run": _grid(results, "run", key, runs, columns, 100)}
    if reference is not None and not reference.empty:
        # A published model with none of this table's numbers would be an empty row.
        parts = {
            "reference": _grid(
                reference, "model", key, list(dict.fromkeys(reference["model"])), columns, 1
            ).dropna(how="all"),
            **parts,
        }
    return pd.concat(parts, names=["kind", "model"])


def retrieval_table(
    results: pd.DataFrame,
    *,
    benchmarks: list[str] | None = None,
    recall: str = "R@1",
    run_order: list[str] | None = None,
    reference: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Recall@K in percent: rows (kind, model), columns (benchmark, I→T/T→I).

    ``benchmarks`` and ``run_order`` select and order columns and rows (default: all, in order
    of first appearance); ``reference`` rows (from ``load_reference``) go above the runs.
    """
    if recall not in RECALLS:
        raise ValueError(f"recall must be one of {list(RECALLS)}, got {recall!r}")
    scores = results[(results["task"] == "retrieval") & (results["metric"] == recall)]
    if scores.empty:
        raise ValueError("no retrieval results")
    if reference is not None:
        reference = reference[reference["direction"].isin(DIRECTIONS.values())]
        reference = reference[reference["metric"] == recall]
    table = _table(scores, "direction", DIRECTIONS.values(), benchmarks, run_order, reference)
    table.attrs["metric"] = recall
    return table


def classification_table(
    results: pd.DataFrame,
    *,
    benchmarks: list[str] | None = None,
    run_order: list[str] | None = None,
    reference: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Top-1/top-5 accuracy in percent: rows (kind, model), columns (benchmark, top1/top5)."""
    scores = results[results["task"] == "classification"]
    if scores.empty:
        raise ValueError("no classification results")
    if reference is not None:
        reference = reference[(reference["direction"] == "") & reference["metric"].isin(TOP_K)]
    return _table(scores, "metric", TOP_K, benchmarks, run_order, reference)


def _flat(table: pd.DataFrame) -> pd.DataFrame:
    """One header level, e.g. "urban1k I→T R@1", with kind and model as ordinary columns."""
    metric = table.attrs.get("metric")
    flat = table.copy()
    flat.columns = [" ".join((*col, metric) if metric else col) for col in table.columns]
    return flat.reset_index()


def to_markdown(table: pd.DataFrame) -> str:
    flat = _flat(table)
    # tabulate only treats None as missing; NaN would print as "nan".
    flat = flat.astype(object).where(flat.notna(), None)
    return flat.to_markdown(index=False, floatfmt=".1f", missingval="–")


def to_csv(table: pd.DataFrame, path: Path) -> None:
    _flat(table).to_csv(path, index=False, float_format="%.1f")


def _tex(text: object) -> str:
    return "".join(_TEX_ESCAPES.get(c, c) for c in str(text))


def _tex_cell(value: float, best: float | None) -> str:
    if pd.isna(value):
        return "--"
    return rf"\textbf{{{value:.1f}}}" if value == best else f"{value:.1f}"


def to_latex(table: pd.DataFrame, caption: str, label: str) -> str:
    """A booktabs table; per column the best run is bold (references never are)."""
    spans = table.columns.get_level_values(0).value_counts(sort=False)
    header, rules, start = [_tex(table.attrs.get("metric", ""))], [], 2
    for benchmark, width in spans.items():
        header.append(rf"\multicolumn{{{width}}}{{c}}{{{_tex(benchmark)}}}")
        rules.append(rf"\cmidrule(lr){{{start}-{start + width - 1}}}")
        start += width
    best = table.loc["run"].max()
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        rf"\caption{{{caption}}}",
        rf"\label{{{label}}}",
        rf"\begin{{tabular}}{{l{'c' * len(table.columns)}}}",
        r"\toprule",
        " & ".join(header) + r" \\",
        " ".join(rules),
        " & ".join(["Model", *(_tex(c) for c in table.columns.get_level_values(1))]) + r" \\",
    ]
    for kind in KINDS:
        if kind not in table.index.get_level_values("kind"):
            continue
        lines.append(r"\midrule")
        for model, values in table.loc[kind].iterrows():
            cells = [
                _tex_cell(v, best[col] if kind == "run" else None) for col, v in values.items()
            ]
            lines.append(" & ".join([_tex(model), *cells]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def plot_retrieval(table: pd.DataFrame, path: Path) -> None:
    """Grouped bars: one group per benchmark and direction, one bar per model."""
    labels = ["\n".join(col) for col in table.columns]
    x = np.arange(len(labels))
    width = 0.8 / len(table)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(labels) + 2), 4), layout="constrained")
    for i, ((kind, model), values) in enumerate(table.iterrows()):
        ax.bar(
            x + (i - (len(table) - 1) / 2) * width,
            values.to_numpy(dtype=float),
            width,
            label=f"{model} (published)" if kind == "reference" else model,
            hatch="//" if kind == "reference" else None,
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
