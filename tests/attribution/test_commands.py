"""The `attribute` command and the demo stage, end to end on a saved tiny LLaVA with a transcoders artifact."""
import json

import pytest

from llava_circuits.attribution.commands import attribute
from llava_circuits.attribution.stage import BARS, attribution_stage
from llava_circuits.models.load import load_model
from llava_circuits.models.tiny import save_tiny, tiny_llava
from llava_circuits.transcoders.io import save_transcoders

from .conftest import make_transcoders, random_image
from .test_export import check_graph_format


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(model dir, transcoders artifact dir) on disk, as a user has them."""
    root = tmp_path_factory.mktemp("attribute")
    model_dir = save_tiny(tiny_llava(seed=2), root / "model")
    loaded = load_model(model_dir, dtype="float32")
    save_transcoders(make_transcoders("plt-topk-skip"), root / "stage" / "transcoders" / "transcoders",
                     loaded.fingerprint())
    return model_dir, root / "stage" / "transcoders" / "transcoders", loaded


def test_attribute_writes_a_viewer_graph_and_the_patch_png(saved, tmp_path):
    model_dir, tc_dir, loaded = saved
    random_image().save(tmp_path / "img.png")
    out = tmp_path / "run" / "graph.json"
    summary = attribute(str(model_dir), str(tc_dir), "is there a cat ?", str(out), image=str(tmp_path / "img.png"),
                        target="yes", contrast="no", dtype="float32", artifact=str(tmp_path / "art"),
                        config="configs/toy/attribution.yaml")
    check_graph_format(json.loads(out.read_text()), loaded.anatomy.n_layers)
    assert (tmp_path / "run" / "graph.patches.png").is_file() and (tmp_path / "art" / "artifact.json").is_file()
    assert summary["completeness_rel_error"] <= 1e-4
    assert summary["target"] == "yes - no" and len(summary["top_patch"]) == 2
    with pytest.raises(ValueError, match="--contrast needs --target"):
        attribute(str(model_dir), str(tc_dir), "is there a cat ?", str(out), contrast="no")


def test_demo_stage_reports_its_figures(saved, tmp_path):
    _, tc_dir, loaded = saved
    out = tc_dir.parent.parent / "attribution"
    metrics = attribution_stage(loaded, tmp_path, out, n_prompts=3, n_pngs=1, answers=("yes", "no"))
    assert set(BARS) <= set(metrics) and all(isinstance(v, float) for v in metrics.values())
    assert metrics["completeness_rel_error"] <= 1e-4  # holds for any model; pointing needs the trained toy
    assert 0.0 <= metrics["patch_pointing_accuracy"] <= 1.0
    assert (out / "patches_0.png").is_file() and (out / "graph_0.json").is_file()
