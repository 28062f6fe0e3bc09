import pyarrow as pa
import pytest

from hic.text import text_problem
from hic.words import word_counts


def test_word_counts_handles_blank_null_and_runs_of_whitespace():
    texts = pa.array(["a red ball", "", None, "  spaced\tout \n words  ", "one", "ünïcode wörds"])
    assert word_counts(texts).to_pylist() == [3, 0, 0, 3, 1, 2]
    assert word_counts(texts).type == pa.int32()


def test_word_counts_on_chunked_arrays():
    chunked = pa.chunked_array([["a b"], ["c d e", None]])
    assert word_counts(chunked).to_pylist() == [2, 3, 0]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("A brown dog lies on the grass.", None),
        ("Line one.\nLine two,\tindented.", None),
        ("A dog \x1b[0m on grass.", "not text (1 control characters)"),
        ("A dog\x06 on\x08 grass.", "not text (2 control characters)"),
        ("A dog \ufffd on grass.", "not text (invalid UTF-8 bytes)"),
        ("12 34 56 a", "not text (1/7 letters)"),
    ],
)
def test_text_problem(text, problem):
    assert text_problem(text) == problem
