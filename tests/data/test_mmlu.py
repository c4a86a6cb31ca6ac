import re

import pytest

from llava_circuits.data.mmlu import read_mmlu
from llava_circuits.data.records import Sample

from .conftest import FIXTURES, corrupt

DATA = FIXTURES / "mmlu" / "data"


def test_csv_folder_of_subjects():
    samples = read_mmlu(DATA)
    assert [s.id for s in samples] == ["abstract_algebra-0", "abstract_algebra-1", "college_biology-0"]
    assert samples[0] == Sample(
        id="abstract_algebra-0",
        question="Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.",
        choices=["0", "4", "2", "6"], answer=1, meta={"subject": "abstract_algebra", "split": "test"})
    assert samples[2].answer == 2 and samples[2].choices[2] == "Shallow water"


def test_split_option_and_single_file():
    assert [s.id for s in read_mmlu(DATA, split="dev")] == ["abstract_algebra-0"]
    assert len(read_mmlu(DATA / "test" / "college_biology_test.csv")) == 1
    with pytest.raises(ValueError, match="no <subject>_val.csv"):
        read_mmlu(DATA, split="val")


def test_parquet_matches_csv(mmlu_parquet):
    from_parquet = read_mmlu(mmlu_parquet)
    assert from_parquet == read_mmlu(DATA / "test" / "abstract_algebra_test.csv")


@pytest.mark.parametrize("old, new, message", [
    (",8,2,24,120,C", ",8,2,24,120,E", "field 'answer' must be one of A, B, C, D, got 'E'"),
    (",8,2,24,120,C", ",8,2,24,C", "expected 6 fields question,A,B,C,D,answer, got 5"),
])
def test_malformed_row_names_file_and_line(tmp_path, old, new, message):
    bad = corrupt(DATA / "test" / "abstract_algebra_test.csv", tmp_path, old, new)
    with pytest.raises(ValueError, match=re.escape(f"{bad}:2: {message}")):
        read_mmlu(bad)


def test_release_root_reads_the_split_folder_only(tmp_path):
    import shutil
    shutil.copytree(DATA, tmp_path / "data")
    aux = tmp_path / "data" / "auxiliary_train"
    aux.mkdir()
    shutil.copy(DATA / "test" / "college_biology_test.csv", aux / "mc_test.csv")  # MCTest's file, not a subject
    expected = ["abstract_algebra-0", "abstract_algebra-1", "college_biology-0"]
    assert [s.id for s in read_mmlu(tmp_path / "data")] == expected
    assert [s.id for s in read_mmlu(tmp_path)] == expected  # the folder above data/
    assert [s.id for s in read_mmlu(tmp_path / "data" / "test")] == expected  # the split folder itself


def test_hub_layout_reads_all_once_not_the_subject_copies(mmlu_parquet, tmp_path):
    import shutil
    root = tmp_path / "mmlu"
    shutil.copytree(mmlu_parquet, root)
    (root / "abstract_algebra").mkdir()
    shutil.copy(root / "all" / "test-00000-of-00001.parquet", root / "abstract_algebra" / "test-00000-of-00001.parquet")
    assert read_mmlu(root) == read_mmlu(DATA / "test" / "abstract_algebra_test.csv")
    shutil.rmtree(root / "all")  # without all/, the subject folders hold the questions
    assert read_mmlu(root) == read_mmlu(DATA / "test" / "abstract_algebra_test.csv")
