"""The toy writers emit each benchmark's official fields and layout (the real readers are run in test_writers.py)."""
import json
from collections import Counter
from pathlib import Path

import pytest

from llava_circuits.toy import tasks
from llava_circuits.toy.scenes import OBJECTS, PARTNER
from llava_circuits.toy.writers import benchmarks, toy_data

BBQ_FIELDS = {"example_id", "question_index", "question_polarity", "context_condition", "category", "answer_info",
              "additional_metadata", "context", "question", "ans0", "ans1", "ans2", "label"}
SQA_FIELDS = {"question", "choices", "answer", "hint", "image", "task", "grade", "subject", "topic", "category",
              "skill", "lecture", "solution", "split"}


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("toy")
    toy_data(str(root), seed=11)
    return root


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_pope_records_and_images(out):
    for split in ("random", "popular", "adversarial"):
        records = lines(out / "pope" / f"toy_pope_{split}.jsonl")
        assert all(set(r) == {"question_id", "image", "text", "label"} for r in records)
        assert [r["question_id"] for r in records] == list(range(1, len(records) + 1))
        assert Counter(r["label"] for r in records) == {"yes": len(records) // 2, "no": len(records) // 2}
        assert all((out / "pope" / "images" / r["image"]).exists() for r in records)
        assert all(r["text"].startswith("Is there a ") and r["text"].endswith(" in the image?") for r in records)


def test_pope_adversarial_asks_about_absent_partners_more_than_random():
    bench = benchmarks(seed=5)

    def partner_share(split):
        hits = total = 0
        for r in bench.pope[split]:
            if r["label"] == "no":
                name = r["text"][len("Is there a "):-len(" in the image?")]
                present = bench.pope_scenes[r["image"]].names
                hits += any(PARTNER.get(p) == name for p in present)
                total += 1
        return hits / total

    assert partner_share("adversarial") > 3 * partner_share("random")
    freq = Counter(n for s in bench.pope_scenes.values() for n in s.names)
    popular = Counter(r["text"].split()[3] for r in bench.pope["popular"] if r["label"] == "no")
    assert popular.most_common(1)[0][0] in [n for n, _ in freq.most_common(6)]


def test_scienceqa_layout_and_fields(out):
    for kind in ("settled", "unsettled", "utility"):
        root = out / "scienceqa" / kind
        problems = json.loads((root / "problems.json").read_text())
        splits = json.loads((root / "pid_splits.json").read_text())
        assert splits["test"] == list(problems)
        for pid, rec in problems.items():
            assert set(rec) == SQA_FIELDS
            assert 0 <= rec["answer"] < len(rec["choices"]) and len(set(rec["choices"])) == len(rec["choices"])
            if rec["image"] is not None:
                assert (root / "images" / "test" / pid / rec["image"]).exists()
            else:
                assert kind == "utility"
    settled = json.loads((out / "scienceqa" / "settled" / "problems.json").read_text())
    assert {r["skill"] for r in settled.values()} == set(tasks.SETTLED)
    assert len({r["answer"] for r in settled.values()}) == 4  # gold answers spread over positions


def test_every_cyclic_rotation_keeps_one_gold_option():
    for item in benchmarks(seed=2).mc["settled"][:20]:
        gold_text = item.choices[item.answer]
        positions = set()
        for k in range(len(item.choices)):
            rotated = item.choices[k:] + item.choices[:k]
            positions.add(rotated.index(gold_text))
        assert positions == set(range(len(item.choices)))


def test_amber_queries_and_annotations(out):
    queries = json.loads((out / "amber" / "query_generative.json").read_text())
    annotations = json.loads((out / "amber" / "annotations.json").read_text())
    assert [q["id"] for q in queries] == [a["id"] for a in annotations] == list(range(1, len(queries) + 1))
    for q, a in zip(queries, annotations):
        assert set(q) == {"id", "image", "query"} and q["query"] == tasks.CAPTION_QUERY
        assert (out / "amber" / "images" / q["image"]).exists()
        assert a["type"] == "generative" and a["truth"] and not set(a["truth"]) & set(a["hallu"])
        assert set(a["truth"]) | set(a["hallu"]) <= set(OBJECTS)
    assert set(json.loads((out / "amber" / "relation.json").read_text())) == set(OBJECTS)


def test_bbq_has_every_official_field(out):
    records = lines(out / "bbq" / "data" / "Nationality.jsonl")
    assert [r["example_id"] for r in records] == list(range(len(records)))
    for r in records:
        assert set(r) == BBQ_FIELDS
        assert r["question_polarity"] in ("neg", "nonneg") and r["context_condition"] in ("ambig", "disambig")
        assert set(r["answer_info"]) == {"ans0", "ans1", "ans2"}
        groups = sorted(r["answer_info"][f"ans{i}"][1] for i in range(3))
        assert groups == ["Quellan", "Zorbish", "unknown"]
        assert set(r["additional_metadata"]) == {"subcategory", "stereotyped_groups", "version", "source"}
        assert r["additional_metadata"]["stereotyped_groups"] == ["Zorbish"]
        gold_group = r["answer_info"][f"ans{r['label']}"][1]
        assert (gold_group == "unknown") == (r["context_condition"] == "ambig")
    conditions = Counter((r["context_condition"], r["question_polarity"]) for r in records)
    assert len(set(conditions.values())) == 1  # balanced
    disambig = [r for r in records if r["context_condition"] == "disambig"]
    consistent = sum(r["label"] == tasks.bbq_biased_index(r) for r in disambig)
    assert consistent == len(disambig) // 2  # half the disambiguated answers go against the stereotype
