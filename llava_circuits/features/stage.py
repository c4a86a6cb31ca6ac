"""The demo's `features` stage: discover the features behind the toy's co-occurrence bias, then steer them.

On toy data of another seed (discovery), POPE adversarial is captured through the transcoders, classified
(configs/toy/features.yaml: among absent objects, GOOD a correct "no", BAD a false "yes"), analyzed at the
answering position and the selection steered there (`steer`); on the demo's own
data the steering is measured against the unsteered model and against as many random active features:

    steer_yes_ratio_shift             yes_ratio(unsteered) - yes_ratio(steered) on POPE adversarial
                                      (positive: fewer "yes" to absent partner objects, the intended way)
    steer_random_accuracy_drop        accuracy(unsteered) - accuracy(steered) on POPE random
    random_features_yes_ratio_shift   yes_ratio(unsteered) - yes_ratio(random features steered), adversarial
    false_yes_share_unsteered         share of adversarial questions answered with a false "yes": the largest
                                      shift that leaves every present object's "yes" alone
    false_yes_removed                 fraction of those false "yes" the steering turned into "no"
"""
from __future__ import annotations

import json
from pathlib import Path

from llava_circuits.evaluation.run import evaluate_loaded, write_json
from llava_circuits.features.capture import capture_loaded
from llava_circuits.features.classify import classify_run
from llava_circuits.features.config import FeaturesConfig, load_config
from llava_circuits.features.stats import analyze_run
from llava_circuits.features.steer import FeatureSteering, random_like, selected
from llava_circuits.models.load import Loaded

TOY_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "toy" / "features.yaml"

FEATURES_BARS = {
    "steer_yes_ratio_shift": (">= 0.10", lambda f: f["steer_yes_ratio_shift"] >= 0.10),
    "steer_random_accuracy_drop": ("<= 0.02", lambda f: f["steer_random_accuracy_drop"] <= 0.02),
    "random_features_yes_ratio_shift": ("|.| < steer shift / 3",
                                        lambda f: abs(f["random_features_yes_ratio_shift"]) < f["steer_yes_ratio_shift"] / 3),
}


def toy_transcoders(loaded: Loaded, data_dir: Path, out: Path) -> Path:
    """The transcoders stage's artifact when the demo made one (OUT/../transcoders/transcoders), else a fresh one."""
    made = out.parent / "transcoders" / "transcoders"
    if (made / "artifact.json").is_file():
        return made
    from llava_circuits.transcoders.demo import transcoders_stage

    transcoders_stage(loaded, data_dir, out / "transcoders_stage")
    return out / "transcoders_stage" / "transcoders"


def pope_files(manifest_dir: Path, split: str) -> tuple[str, str]:
    files = json.loads((manifest_dir / "manifest.json").read_text())[f"pope_{split}"]["files"]
    return files[0], files[1]


def discover(loaded: Loaded, transcoders: Path, out: Path, cfg: FeaturesConfig) -> Path:
    """Capture, classify and analyze POPE adversarial of the discovery seed; returns the run directory."""
    from llava_circuits.toy.writers import toy_data
    from llava_circuits.transcoders.replacement import ReplacementModel

    data = out / "discovery_data"
    if not (data / "manifest.json").is_file():
        toy_data(str(data), cfg.demo.discovery_seed)
    questions, images = pope_files(data, "adversarial")
    run = out / "discovery"
    replacement = ReplacementModel.load(transcoders, loaded, error_term=cfg.capture.error_term)
    capture_loaded(loaded, replacement, "pope", questions, run, images, cfg.capture, limit=cfg.demo.discovery_limit,
                   record={"transcoders": str(transcoders)})
    classify_run(run, cfg.classify)
    analyze_run(run, cfg.analyze, dataset="pope_adversarial")
    return run


def measure(loaded: Loaded, data_dir: Path, out: Path, name: str, interventions: list) -> dict[str, dict]:
    """POPE adversarial and random metrics with the given interventions attached."""
    results = {}
    for split in ("adversarial", "random"):
        questions, images = pope_files(data_dir, split)
        results[split] = evaluate_loaded(loaded, "pope", questions, out / "eval" / name / split, images, interventions,
                                         batch_size=16, progress=False)
    return results


def features_stage(loaded: Loaded, data_dir: Path, out: Path, config: str | Path = TOY_CONFIG) -> dict[str, float]:
    """The stage's figures (module docstring); everything it made stays under `out`."""
    from llava_circuits.transcoders.io import load_transcoders

    cfg, out = load_config(config), Path(out)
    transcoders = toy_transcoders(loaded, Path(data_dir), out)
    run = discover(loaded, transcoders, out, cfg)
    features = selected(run, cfg.steer.which, cfg.steer.top, "pope_adversarial")
    if not features:
        raise ValueError(f"{run}: no {cfg.steer.which} features were selected on the toy; nothing to steer")
    randoms = random_like(run, features, cfg.demo.random_seed)
    tcs = load_transcoders(transcoders, loaded.fingerprint())
    steer = FeatureSteering.build(tcs, features, cfg.steer, loaded.fingerprint(), str(transcoders))
    control = FeatureSteering.build(tcs, randoms, cfg.steer, loaded.fingerprint(), str(transcoders))
    steer.save(out / "steer_selected")
    control.save(out / "steer_random")
    base = measure(loaded, Path(data_dir), out, "unsteered", [])
    steered = measure(loaded, Path(data_dir), out, "selected", [steer])
    randomly = measure(loaded, Path(data_dir), out, "random", [control])
    figures = {
        "steer_yes_ratio_shift": base["adversarial"]["yes_ratio"] - steered["adversarial"]["yes_ratio"],
        "steer_random_accuracy_drop": base["random"]["accuracy"] - steered["random"]["accuracy"],
        "random_features_yes_ratio_shift": base["adversarial"]["yes_ratio"] - randomly["adversarial"]["yes_ratio"],
        "steered_features": float(len(features)),
        "adversarial_accuracy_unsteered": base["adversarial"]["accuracy"],
        "adversarial_accuracy_steered": steered["adversarial"]["accuracy"],
        "random_features_random_accuracy_drop": base["random"]["accuracy"] - randomly["random"]["accuracy"],
        # the shift that removing every false "yes" and nothing else would give: beyond it, present objects get "no"
        "false_yes_share_unsteered": base["adversarial"]["yes_ratio"] * (1 - base["adversarial"]["precision"]),
        "false_yes_removed": 1 - steered["adversarial"]["fp_rate"] / max(base["adversarial"]["fp_rate"], 1e-12),
    }
    write_json(out / "figures.json", {**figures, "features": features, "random_features": randoms,
                                      "steer": cfg.steer.__dict__, "transcoders": str(transcoders)})
    return figures
