"""`llava-circuits demo`: the whole pipeline on the toy world, one stage per method, into report.md and metrics.json."""
from __future__ import annotations

import json
import shlex
import shutil
import time
from pathlib import Path
from typing import Callable

from llava_circuits.bench import TOY
from llava_circuits.evaluation.run import write_json
from llava_circuits.models.load import Loaded, load_model

DEMO_SEED = 7919  # toy data from a seed that training never used

# figure -> (bar as text, check); the bars are the acceptance bars of the issue that owns the stage
TOY_BARS: dict[str, tuple[str, Callable[[dict], bool]]] = {
    "pope_random_accuracy": (">= 0.95", lambda f: f["pope_random_accuracy"] >= 0.95),
    "mc_settled_min_accuracy": (">= 0.95", lambda f: f["mc_settled_min_accuracy"] >= 0.95),
    "mc_unsettled_position_gap": (">= 0.30", lambda f: f["mc_unsettled_position_gap"] >= 0.30),
    "pope_adversarial_fp_rate": (">= 3 x random", lambda f: f["pope_adversarial_fp_rate"] >= 3 * f["pope_random_fp_rate"]),
    "bbq_bias_score_ambig": (">= 0.5", lambda f: f["bbq_bias_score_ambig"] >= 0.5),
    "bbq_accuracy_disambig": (">= 0.9", lambda f: f["bbq_accuracy_disambig"] >= 0.9),
}


def run_manifest_eval(command: str, model: str, out: Path) -> dict:
    """Run one of the manifest's eval commands in this process and return its metrics."""
    from llava_circuits.cli import build_parser

    argv = shlex.split(command.replace("{model}", shlex.quote(model)).replace("{out}", shlex.quote(str(out))))
    args = vars(build_parser().parse_args(argv[1:]))
    fn = args.pop("_fn")
    args.pop("command")
    return fn(**args)


def toy_stage(loaded: Loaded, data_dir: Path, out: Path) -> dict:
    """The toy's skills and its planted biases, measured by the manifest's own eval commands."""
    manifest = json.loads((data_dir / "manifest.json").read_text())
    m = {key: run_manifest_eval(manifest[key]["eval"], loaded.name_or_path, out / key)
         for key in ("pope_random", "pope_adversarial", "mc_settled", "mc_unsettled", "bbq")}
    return {
        "pope_random_accuracy": m["pope_random"]["accuracy"],
        "mc_settled_min_accuracy": min(m["mc_settled"]["accuracy_by_gold_position"].values()),
        "mc_unsettled_position_gap": m["mc_unsettled"]["position_gap"],
        "pope_random_fp_rate": m["pope_random"]["fp_rate"],
        "pope_adversarial_fp_rate": m["pope_adversarial"]["fp_rate"],
        "bbq_bias_score_ambig": m["bbq"]["bias_score_ambig"],
        "bbq_accuracy_disambig": m["bbq"]["accuracy_disambig"],
    }


def attention_stage(loaded: Loaded, data_dir: Path, out: Path) -> dict:
    from llava_circuits.attention.stage import attention_stage as run

    return run(loaded, data_dir, out, n_search=150, n_pointing=100)


def steerfair_stage(loaded: Loaded, data_dir: Path, out: Path) -> dict:
    from llava_circuits.steering.steerfair import steerfair_stage as run

    return run(loaded, data_dir, out)


def barrier_stage(loaded: Loaded, data_dir: Path, out: Path) -> dict:
    from llava_circuits.steering.barrier import barrier_stage as run

    return run(loaded, data_dir, out)


ATTENTION_BARS = {
    "pointing_accuracy_top_heads": (">= 0.80, clearly above a random head", lambda f: f["pointing_accuracy_top_heads"] >= 0.8
                                    and f["pointing_accuracy_top_heads"] >= f["pointing_accuracy_random_head"] + 0.2),
}
STEERFAIR_BARS = {
    "position_gap_after": ("<= 0.5 x before", lambda f: f["position_gap_after"] <= 0.5 * f["position_gap_before"]),
    "permutation_std_after": ("<= 0.5 x before", lambda f: f["permutation_std_after"] <= 0.5 * f["permutation_std_before"]),
    "settled_accuracy_after": (">= before - 0.02", lambda f: f["settled_accuracy_after"] >= f["settled_accuracy_before"] - 0.02),
}
BARRIER_BARS = {
    "adversarial_fp_rate_after": ("<= 0.7 x before", lambda f: f["adversarial_fp_rate_after"] <= 0.7 * f["adversarial_fp_rate_before"]),
    "random_accuracy_after": (">= before - 0.02", lambda f: f["random_accuracy_after"] >= f["random_accuracy_before"] - 0.02),
    "min_h_after_minus_tau": (">= 0 (float tolerance 1e-6)", lambda f: f["min_h_after_minus_tau"] >= -1e-6),
}

def transcoders_stage(loaded: Loaded, data_dir: Path, out: Path) -> dict:
    from llava_circuits.transcoders.demo import transcoders_stage as run

    return run(loaded, data_dir, out)


TRANSCODERS_BARS = {
    "fvu_max": ("<= 0.10", lambda f: f["fvu_max"] <= 0.10),
    "l0_fraction_max": ("<= 0.05", lambda f: f["l0_fraction_max"] <= 0.05),
    "dead_fraction_max": ("<= 0.01", lambda f: f["dead_fraction_max"] <= 0.01),
    "next_token_agreement": (">= 0.80", lambda f: f["next_token_agreement"] >= 0.80),
    "exact_with_error_max_abs_diff": ("<= 1e-5", lambda f: f["exact_with_error_max_abs_diff"] <= 1e-5),
}


def features_stage(loaded: Loaded, data_dir: Path, out: Path) -> dict:
    from llava_circuits.features.stage import features_stage as run

    return run(loaded, data_dir, out)


def attribution_stage(loaded: Loaded, data_dir: Path, out: Path) -> dict:
    from llava_circuits.attribution.stage import attribution_stage as run

    return run(loaded, data_dir, out)  # reads the transcoders stage's artifact from out/../transcoders


def stage_bars(module: str, name: str) -> dict:
    import importlib

    return getattr(importlib.import_module(module), name)


def pruning_stage(loaded: Loaded, data_dir: Path, out: Path) -> dict:
    from llava_circuits.pruning.stage import pruning_stage as run

    return run(loaded, data_dir, out)


STAGES: list[tuple[str, Callable[[Loaded, Path, Path], dict], dict]] = [
    ("toy", toy_stage, TOY_BARS),
    ("attention", attention_stage, ATTENTION_BARS),
    ("transcoders", transcoders_stage, TRANSCODERS_BARS),
    ("features", features_stage, stage_bars("llava_circuits.features.stage", "FEATURES_BARS")),
    ("attribution", attribution_stage, stage_bars("llava_circuits.attribution.stage", "BARS")),
    ("steerfair", steerfair_stage, STEERFAIR_BARS),
    ("barrier", barrier_stage, BARRIER_BARS),
    ("pruning", pruning_stage, stage_bars("llava_circuits.pruning.stage", "PRUNING_BARS")),
]


def demo_model(out: Path) -> tuple[Loaded, str | None]:
    """The committed toy model, or a tiny random LLaVA (and a warning) when it is missing."""
    if TOY.is_dir():
        return load_model(TOY, dtype="float32"), None
    from llava_circuits.models.tiny import save_tiny, tiny_llava

    path = save_tiny(tiny_llava(), out / "tiny-random-llava")
    return load_model(path, dtype="float32"), f"{TOY} is missing: this ran on a tiny RANDOM model, the figures mean nothing"


def report(results: dict, seconds: dict, warning: str | None) -> str:
    lines = ["# llava-circuits demo on the toy world", ""]
    if warning:
        lines += [f"**Warning: {warning}.**", ""]
    for name, _, bars in STAGES:
        if name not in results:
            continue
        lines += [f"## {name} ({seconds.get(name, float('nan')):.0f} s)", "", "| figure | value | bar | holds |", "| --- | --- | --- | --- |"]
        figures = results[name]
        for key, value in figures.items():
            bar, check = bars.get(key, ("", None))
            holds = "" if check is None else ("yes" if check(figures) else "**no**")
            shown = f"{value:.4f}" if isinstance(value, (int, float)) else str(value)
            lines.append(f"| {key} | {shown} | {bar} | {holds} |")
        lines += [""] + [f"![{Path(png).stem}]({name}/{png})" for png in figures.get("overlays", [])] + [""]
    return "\n".join(lines)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def demo(out: str = "demo-out", seed: int = DEMO_SEED, scale: float = 1.0, stages: list[str] | None = None) -> dict:
    """Run the whole pipeline on the toy world and write OUT/report.md and OUT/metrics.json.

    Args:
        out: output directory
        seed: seed of the toy data the demo measures on (training never used it)
        scale: size of the toy benchmarks relative to `toy data`'s default (1.0, the full benchmarks: the whole
            demo took 3 min 8 s on 2 cores on 2026-12-02; smaller scales make the rates coarse, at 0.3 POPE has 145
            negatives per split)
        stages: run only these stages (repeatable), each into a cleared OUT/<stage> so that no answer of an earlier
            run is reused; the figures of the others are kept from OUT/metrics.json
    """
    from llava_circuits.toy.writers import toy_data

    names = [name for name, _, _ in STAGES]
    unknown = sorted(set(stages or ()) - set(names))
    if unknown:
        raise ValueError(f"demo: unknown stage(s) {unknown}; stages are {names}")
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    loaded, warning = demo_model(root)
    data_dir = root / "data"
    toy_data(str(data_dir), seed, scale)  # deterministic: a rerun rewrites the same files
    kept = read_json(root / "metrics.json") if stages else {}
    results, seconds = {}, read_json(root / "seconds.json") if stages else {}
    for name, stage, _ in STAGES:
        if stages and name not in stages:
            if name in kept:
                results[name] = kept[name]
            continue
        if stages:
            shutil.rmtree(root / name, ignore_errors=True)
        start = time.time()
        results[name] = stage(loaded, data_dir, root / name)
        seconds[name] = time.time() - start
        write_json(root / "metrics.json", results | {k: v for k, v in kept.items() if k not in results})
        write_json(root / "seconds.json", seconds)  # after every stage: a crash keeps what is done
    (root / "report.md").write_text(report(results, seconds, warning))
    print(f"wrote {root / 'report.md'} and {root / 'metrics.json'}")
    return results
