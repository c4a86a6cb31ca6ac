"""features classify: GOOD / BAD from official per-sample results, counts, and the minimum-size warning."""
import json
from pathlib import Path

import pytest

from llava_circuits.data.readers import read_benchmark
from llava_circuits.features.classify import classify_run, compare, per_sample_results
from llava_circuits.features.config import ClassifyConfig, Rule
from llava_circuits.metrics import parse_pope_answer

from .conftest import pope_file

FIXTURES = Path(__file__).parents[1] / "fixtures"


def write_run(run: Path, bench: str, data: Path, responses: list[dict], images: Path | None = None) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / "capture.json").write_text(json.dumps({"bench": bench, "data": str(data), "images": str(images) if images else None}))
    (run / "responses.jsonl").write_text("".join(json.dumps(r) + "\n" for r in responses))


def test_pope_good_is_correct_by_the_official_parsing_and_small_classes_warn(tmp_path):
    data = pope_file(tmp_path / "pope", 8)
    answers = ["Yes", "no.", "No, there is not", "yes", "Not really", "NO", "There is no cat", "Yes. No."]
    write_run(tmp_path / "run", "pope", data, [{"id": str(i), "response": a} for i, a in enumerate(answers)],
              tmp_path / "pope" / "images")
    with pytest.warns(UserWarning, match="fewer than the minimum 5"):
        out = classify_run(tmp_path / "run", ClassifyConfig(min_class_size=5))
    labels = ["yes" if i % 2 else "no" for i in range(8)]
    good = sorted(str(i) for i, a in enumerate(answers) if parse_pope_answer(a) == labels[i])
    assert sorted(e["id"] for e in out["GOOD"]) == good
    assert out["counts"] == {"GOOD": len(good), "BAD": 8 - len(good), "neither": 0}
    assert all(e["accuracy"] == 1.0 and e["correct"] == 1.0 for e in out["GOOD"])
    assert json.loads((tmp_path / "run" / "classification.json").read_text())["warnings"] == out["warnings"]


def test_a_gold_filter_keeps_only_those_questions(tmp_path):
    data = pope_file(tmp_path / "pope", 8)
    answers = ["Yes", "yes", "no", "no", "Yes", "yes", "no", "no"]  # gold: no, yes, no, yes, ...
    write_run(tmp_path / "run", "pope", data, [{"id": str(i), "response": a} for i, a in enumerate(answers)],
              tmp_path / "pope" / "images")
    out = classify_run(tmp_path / "run", ClassifyConfig(min_class_size=1), Rule("accuracy", gold=["No"]))
    assert sorted(e["id"] for e in out["GOOD"]) == ["2", "6"]  # absent object, answered no
    assert sorted(e["id"] for e in out["BAD"]) == ["0", "4"]  # absent object, hallucinated yes
    assert out["counts"]["neither"] == 4 and out["rule"]["gold"] == ["No"]


def test_amber_good_is_full_coverage_by_the_official_metric(tmp_path):
    query = FIXTURES / "amber" / "query" / "query_all.json"
    samples = [s for s in read_benchmark("amber", query, images=tmp_path) if s.meta.get("type") != "discriminative"]
    first, second = samples[0], samples[1]
    truth = first.meta["truth_objects"]
    responses = {first.id: {"id": first.id, "response": "A picture of " + " and ".join(truth) + "."},
                 second.id: {"id": second.id, "response": "A " + second.meta["truth_objects"][0] + " and a dog."}}
    results = per_sample_results("amber", samples, responses)
    assert results[first.id]["cover"] == 1.0 and results[second.id]["cover"] < 1.0
    write_run(tmp_path / "run", "amber", query, list(responses.values()), tmp_path)
    out = classify_run(tmp_path / "run", ClassifyConfig(min_class_size=1))
    assert [e["id"] for e in out["GOOD"]] == [first.id] and [e["id"] for e in out["BAD"]] == [second.id]


def test_rules_compare_and_refuse_nonsense():
    assert compare(">= 1", 1.0) and not compare("< 1", 1.0) and compare("<= 0", 0.0) and compare("> 0.5", 0.75)
    with pytest.raises(ValueError, match="must look like"):
        compare("at least 1", 1.0)


def test_a_rule_on_a_missing_metric_names_the_metrics_there_are(tmp_path):
    data = pope_file(tmp_path / "pope", 2)
    write_run(tmp_path / "run", "pope", data, [{"id": "0", "response": "no"}], tmp_path / "pope" / "images")
    with pytest.raises(ValueError, match="accuracy"):
        classify_run(tmp_path / "run", ClassifyConfig(), Rule("cover"))
