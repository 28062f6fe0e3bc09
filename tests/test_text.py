import pyarrow as pa

from hic.text import word_counts


def test_word_counts_handles_blank_null_and_runs_of_whitespace():
    texts = pa.array(["a red ball", "", None, "  spaced\tout \n words  ", "one", "ünïcode wörds"])
    assert word_counts(texts).to_pylist() == [3, 0, 0, 3, 1, 2]
    assert word_counts(texts).type == pa.int32()


def test_word_counts_on_chunked_arrays():
    chunked = pa.chunked_array([["a b"], ["c d e", None]])
    assert word_counts(chunked).to_pylist() == [2, 3, 0]
