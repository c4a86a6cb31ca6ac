"""MMLU (Hendrycks et al. 2021): four-option questions in 57 subjects.

Two layouts: the original headerless csv files `<subject>_<split>.csv` with rows question,A,B,C,D,answer
(split dev/val/test, in folders data/<split>/), and the Hugging Face cais/mmlu parquet files with columns
question, subject, choices, answer (answer an index).
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from llava_circuits.data.files import choice_index, csv_rows, fail, field, parquet_rows, short, str_list
from llava_circuits.data.records import Sample

LETTERS = "ABCD"
ALIASES = {"val": "validation", "validation": "val"}


def mmlu_files(path: Path, split: str) -> list[Path]:
    """`path` itself, or the files of `split` in the release's layout: data/<split>/<subject>_<split>.csv (path the
    data folder, the folder above it, or the split folder), or cais/mmlu's <split>-*.parquet (all/ holds every
    subject, and the per-subject folders repeat it, so all/ is read when present). auxiliary_train/ is not MMLU."""
    if path.is_file():
        return [path]
    names = (split, ALIASES.get(split, split))

    def csvs(folder: Path) -> list[Path]:
        return sorted(p for p in folder.glob("*.csv") if p.stem.rsplit("_", 1)[-1] in names)

    folders = [root / name for root in (path, path / "data") for name in names] + [path]
    for folder in folders:
        if folder.is_dir() and csvs(folder):
            return csvs(folder)
    for folders in ([path / "all"], [path], sorted(p for p in path.iterdir() if p.is_dir() and p.name != "auxiliary_train")):
        files = sorted(p for folder in folders for p in folder.glob("*.parquet") if p.name.split("-")[0] in names)
        if files:
            return files
    raise ValueError(f"{path}: no <subject>_{split}.csv or {split}-*.parquet files")


def csv_records(path: Path) -> list[tuple[str, list[str], int]]:
    """(question, choices, answer) from a headerless question,A,B,C,D,answer file."""
    out = []
    for at, cells in csv_rows(path):
        if len(cells) != 6:
            raise fail(at, f"expected 6 fields question,A,B,C,D,answer, got {len(cells)}")
        if cells[5].strip() not in tuple(LETTERS):
            raise fail(at, f"field 'answer' must be one of A, B, C, D, got {short(cells[5])}")
        out.append((cells[0], cells[1:5], LETTERS.index(cells[5].strip())))
    return out


def read_mmlu(path: Path, split: str = "test") -> list[Sample]:
    """Samples with choices, answer = gold index, meta subject/split; ids f"{subject}-{i}" (i counts within subject)."""
    seen: Counter[str] = Counter()
    samples = []
    for f in mmlu_files(Path(path), split):
        if f.suffix == ".csv":
            subject = f.stem.rsplit("_", 1)[0] if f.stem.rsplit("_", 1)[-1] in ("dev", "val", "test") else f.stem
            rows = [(subject, *record) for record in csv_records(f)]
        else:
            rows = []
            for at, rec in parquet_rows(f):
                choices = str_list(rec, "choices", at, min_len=2)
                rows.append((field(rec, "subject", str, at), field(rec, "question", str, at), choices,
                             choice_index(rec, "answer", len(choices), at)))
        for subject, question, choices, answer in rows:
            samples.append(Sample(id=f"{subject}-{seen[subject]}", question=question, choices=choices,
                                  answer=answer, meta={"subject": subject, "split": split}))
            seen[subject] += 1
    return samples
