import json

import pytest

from llava_circuits import demo


@pytest.fixture
def fake_world(monkeypatch, tmp_path):
    """Two cheap stages in place of the real ones; each counts its runs."""
    runs = []

    def stage(name, value):
        def run(loaded, data_dir, out):
            runs.append(name)
            assert not (out / "answers.jsonl").exists()  # a rerun starts from an empty stage folder
            out.mkdir(parents=True, exist_ok=True)
            (out / "answers.jsonl").write_text("{}\n")
            return {"x": value}
        return run

    monkeypatch.setattr(demo, "STAGES", [("a", stage("a", 1.0), {"x": (">= 1", lambda f: f["x"] >= 1)}),
                                         ("b", stage("b", 0.0), {"x": (">= 1", lambda f: f["x"] >= 1)})])
    monkeypatch.setattr(demo, "demo_model", lambda out: (None, None))
    monkeypatch.setattr("llava_circuits.toy.writers.toy_data",
                        lambda out, seed, scale: (tmp_path / "out" / "data").mkdir(parents=True, exist_ok=True)
                        or (tmp_path / "out" / "data" / "manifest.json").write_text("{}"))
    return runs, tmp_path / "out"


def test_stages_rerun_only_the_named_ones_and_keep_the_others(fake_world):
    runs, out = fake_world
    demo.demo(str(out))
    assert runs == ["a", "b"]
    demo.demo(str(out), stages=["b"])
    assert runs == ["a", "b", "b"]
    assert json.loads((out / "metrics.json").read_text()) == {"a": {"x": 1.0}, "b": {"x": 0.0}}
    report = (out / "report.md").read_text()
    assert "## a" in report and "| x | 0.0000 | >= 1 | **no** |" in report


def test_unknown_stage_is_one_clear_error(fake_world):
    with pytest.raises(ValueError, match=r"unknown stage\(s\) \['c'\]"):
        demo.demo(str(fake_world[1]), stages=["c"])
