import json
import math
from pathlib import Path

import pandas as pd
import pytest

from hic.tables import (
    REFERENCE_COLUMNS,
    RESULT_COLUMNS,
    ResultError,
    classification_table,
    load_reference,
    load_results,
    plot_retrieval,
    retrieval_table,
    to_csv,
    to_latex,
    to_markdown,
)

REPO_REFERENCE = Path(__file__).resolve().parents[1] / "data" / "reference_results.csv"


def recalls(r1):
    return {"R@1": r1, "R@5": r1 + 0.1, "R@10": r1 + 0.2}


def retrieval(run, benchmark, i2t, t2i):
    return {
        "run": run,
        "benchmark": benchmark,
        "task": "retrieval",
        "n": 100,
        "image_to_text": recalls(i2t),
        "text_to_image": recalls(t2i),
        "protocol": {"prompt": "none"},
    }


def classification(run, benchmark, top1, top5):
    return {
        "run": run,
        "benchmark": benchmark,
        "task": "classification",
        "n": 180,
        "top1": top1,
        "top5": top5,
        "protocol": {},
    }


def write(tmp_path, results):
    paths = []
    for r in results:
        path = tmp_path / "eval" / r["run"] / f"{r['benchmark']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(r))
        paths.append(path)
    return paths


@pytest.fixture
def results(tmp_path):
    # "long" appears first in the files; "urban" before "demo".
    return load_results(
        write(
            tmp_path,
            [
                retrieval("long", "urban", 0.333, 0.25),
                retrieval("long", "demo", 0.12, 0.5),
                retrieval("alt_text", "urban", 0.4, 0.125),
                retrieval("alt_text", "demo", 0.12, 0.3),
                classification("long", "demo_classify", 0.3, 0.7),
                classification("alt_text", "demo_classify", 0.25, 0.655),
            ],
        )
    )


@pytest.fixture
def reference(tmp_path):
    path = tmp_path / "reference.csv"
    path.write_text(
        "# a comment line, skipped\n"
        "model,benchmark,direction,metric,value,source\n"
        "Paper-B,urban,I→T,R@1,90.0,Paper (2024) Table 9 #2\n"
        "Paper-B,urban,T→I,R@1,80.5,Paper (2024) Table 9\n"
        "Paper-B,urban,I→T,R@5,99.0,Paper (2024) Table 9\n"
        "Paper-B,demo_classify,,top1,77.7,Paper (2024) Table 3\n"
        "Other,elsewhere,I→T,R@1,50.0,Other (2023) Table 1\n"
    )
    return load_reference(path)


def test_load_results_long_format(results):
    assert list(results.columns) == RESULT_COLUMNS
    assert len(results) == 4 * 6 + 2 * 2
    row = results[
        (results["run"] == "long")
        & (results["benchmark"] == "demo")
        & (results["direction"] == "T→I")
        & (results["metric"] == "R@5")
    ]
    assert row["value"].item() == pytest.approx(0.6)
    assert row["n"].item() == 100


def test_retrieval_table_values_and_order(results):
    table = retrieval_table(results)
    assert list(table.columns) == [
        ("urban", "I→T"),
        ("urban", "T→I"),
        ("demo", "I→T"),
        ("demo", "T→I"),
    ]
    assert list(table.index) == [("run", "long"), ("run", "alt_text")]
    assert table.loc[("run", "long"), ("urban", "I→T")] == 33.3
    assert table.loc[("run", "alt_text"), ("urban", "T→I")] == 12.5
    assert table.loc[("run", "long"), ("demo", "T→I")] == 50.0
    assert table.attrs["metric"] == "R@1"


def test_retrieval_table_selection_recall_and_run_order(results):
    table = retrieval_table(
        results, benchmarks=["demo", "urban"], recall="R@10", run_order=["alt_text", "long"]
    )
    assert list(table.columns.get_level_values(0)) == ["demo", "demo", "urban", "urban"]
    assert list(table.columns.get_level_values(1)) == ["I→T", "T→I", "I→T", "T→I"]
    assert list(table.index.get_level_values("model")) == ["alt_text", "long"]
    assert table.loc[("run", "alt_text"), ("demo", "T→I")] == 50.0
    only = retrieval_table(results, benchmarks=["demo"], run_order=["long"])
    assert only.shape == (1, 2)


def test_retrieval_table_rejects_unknown_names(results):
    with pytest.raises(ValueError, match="nope"):
        retrieval_table(results, run_order=["long", "nope"])
    with pytest.raises(ValueError, match="coco"):
        retrieval_table(results, benchmarks=["coco"])
    with pytest.raises(ValueError, match="R@2"):
        retrieval_table(results, recall="R@2")


def test_reference_rows_on_top(results, reference):
    table = retrieval_table(results, reference=reference)
    # "Other" has no number in this table's benchmarks, so it gets no empty row.
    assert list(table.index) == [("reference", "Paper-B"), ("run", "long"), ("run", "alt_text")]
    assert table.loc[("reference", "Paper-B"), ("urban", "T→I")] == 80.5
    assert math.isnan(table.loc[("reference", "Paper-B"), ("demo", "I→T")])
    r5 = retrieval_table(results, recall="R@5", reference=reference)
    assert r5.loc[("reference", "Paper-B"), ("urban", "I→T")] == 99.0


def test_classification_table(results, reference):
    table = classification_table(results)
    assert list(table.columns) == [("demo_classify", "top1"), ("demo_classify", "top5")]
    assert list(table.index) == [("run", "long"), ("run", "alt_text")]
    assert table.loc[("run", "alt_text"), ("demo_classify", "top5")] == 65.5
    with_ref = classification_table(results, reference=reference)
    assert with_ref.loc[("reference", "Paper-B"), ("demo_classify", "top1")] == 77.7
    assert math.isnan(with_ref.loc[("reference", "Paper-B"), ("demo_classify", "top5")])


def test_latex_bold_best_among_runs(results, reference):
    tex = to_latex(retrieval_table(results, reference=reference), "Recall@1.", "tab:r1")
    lines = tex.splitlines()
    for command in [r"\toprule", r"\bottomrule", r"\caption{Recall@1.}", r"\label{tab:r1}"]:
        assert command in lines
    assert r"R@1 & \multicolumn{2}{c}{urban} & \multicolumn{2}{c}{demo} \\" in lines
    assert r"Model & I$\rightarrow$T & T$\rightarrow$I & I$\rightarrow$T & T$\rightarrow$I \\" in (
        lines
    )
    # The reference beats every run but is never bold; the demo I→T tie bolds both runs.
    assert r"Paper-B & 90.0 & 80.5 & -- & -- \\" in lines
    assert r"long & 33.3 & \textbf{25.0} & \textbf{12.0} & \textbf{50.0} \\" in lines
    assert r"alt\_text & \textbf{40.0} & 12.5 & \textbf{12.0} & 30.0 \\" in lines
    # A rule separates header, references and runs.
    paper, long = (
        lines.index(r"Paper-B & 90.0 & 80.5 & -- & -- \\"),
        lines.index(r"long & 33.3 & \textbf{25.0} & \textbf{12.0} & \textbf{50.0} \\"),
    )
    assert lines[paper - 1] == r"\midrule" and lines[long - 1] == r"\midrule"


def test_latex_without_references_has_one_midrule(results):
    tex = to_latex(classification_table(results), "Zero-shot.", "tab:cls")
    assert tex.count(r"\midrule") == 1
    assert r"long & \textbf{30.0} & \textbf{70.0} \\" in tex


def test_markdown_headers(results, reference):
    md = to_markdown(retrieval_table(results, reference=reference))
    header = md.splitlines()[0]
    for name in ["kind", "model", "urban I→T R@1", "urban T→I R@1", "demo I→T R@1"]:
        assert name in header
    assert "| reference" in md and "Paper-B" in md
    assert "nan" not in md and "–" in md
    assert "33.3" in md


def test_csv_flat_names(results, tmp_path):
    path = tmp_path / "r1.csv"
    to_csv(retrieval_table(results), path)
    flat = pd.read_csv(path)
    assert list(flat.columns) == [
        "kind",
        "model",
        "urban I→T R@1",
        "urban T→I R@1",
        "demo I→T R@1",
        "demo T→I R@1",
    ]
    assert flat["model"].tolist() == ["long", "alt_text"]
    assert flat.loc[0, "urban I→T R@1"] == 33.3
    cls = tmp_path / "cls.csv"
    to_csv(classification_table(results), cls)
    assert list(pd.read_csv(cls).columns)[2:] == ["demo_classify top1", "demo_classify top5"]


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"run": "a", "task": "retrieval", "n": 1}), "benchmark"),
        (json.dumps({**retrieval("a", "b", 0.1, 0.2), "text_to_image": {"R@1": 0.1}}), "R@10"),
        (json.dumps(retrieval("a", "b", 12.0, 0.2)), "fraction"),
        (json.dumps({**classification("a", "b", 0.1, 0.2), "task": "vqa"}), "unknown task"),
        (json.dumps([1, 2]), "JSON object"),
    ],
)
def test_malformed_result_names_file(tmp_path, content, message):
    good = write(tmp_path, [retrieval("ok", "demo", 0.1, 0.2)])
    bad = tmp_path / "eval" / "broken" / "demo.json"
    bad.parent.mkdir(parents=True)
    bad.write_text(content)
    with pytest.raises(ResultError, match=message) as err:
        load_results([*good, bad])
    assert str(bad) in str(err.value)


def test_duplicate_result_names_both_files(tmp_path):
    first = write(tmp_path, [retrieval("a", "demo", 0.1, 0.2)])
    second = tmp_path / "copy.json"
    second.write_text(first[0].read_text())
    with pytest.raises(ResultError) as err:
        load_results([*first, second])
    assert str(first[0]) in str(err.value) and str(second) in str(err.value)


def test_reference_file_in_repo_loads_and_cites():
    ref = load_reference(REPO_REFERENCE)
    assert list(ref.columns) == REFERENCE_COLUMNS
    assert (ref["source"].str.len() > 0).all()


@pytest.mark.parametrize(
    "row, message",
    [
        ("M,urban,I→T,R@1,50.0,", "source"),
        ("M,urban,I2T,R@1,50.0,Paper Table 1", "direction"),
        ("M,urban,I→T,R@1,0.5x,Paper Table 1", "percentage"),
    ],
)
def test_reference_rejects_bad_rows(tmp_path, row, message):
    path = tmp_path / "ref.csv"
    path.write_text("model,benchmark,direction,metric,value,source\n" + row + "\n")
    with pytest.raises(ResultError, match=message) as err:
        load_reference(path)
    assert str(path) in str(err.value)


def test_plot_writes_png(results, reference, tmp_path):
    path = tmp_path / "retrieval.png"
    plot_retrieval(retrieval_table(results, reference=reference), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
