"""Toy benchmarks in the official file formats, so the real readers and scorers run on them.

`toy_data(out, seed)` writes:

    out/pope/toy_pope_{random,popular,adversarial}.jsonl   POPE: {"question_id", "image", "text", "label"}
    out/pope/images/toy_pope_00001.png ...
    out/scienceqa/{settled,unsettled,utility}/problems.json + pid_splits.json + images/test/<pid>/image.png
    out/amber/query_generative.json, annotations.json, relation.json, safe_words.txt, images/AMBER_1.png ...
    out/bbq/data/Nationality.jsonl                           BBQ: every official field
    out/manifest.json                                        benchmark -> {"files": [...], "eval": "..."}

Paths in the manifest are absolute; `{model}` and `{out}` in the eval commands are placeholders.
All gold answers are the truth; the planted biases live in the training labels only
(`llava_circuits.toy.train`). `benchmarks(seed)` returns the same items in memory.
"""
from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from llava_circuits.toy import tasks
from llava_circuits.toy.scenes import OBJECTS, Scene, render, sample_scene

POPE_SPLITS = ("random", "popular", "adversarial")


@dataclass
class Benchmarks:
    """The toy benchmarks of one seed, in memory."""

    pope_scenes: dict[str, Scene]
    """POPE image file name -> scene."""
    pope: dict[str, list[dict]]
    """split -> POPE records."""
    mc: dict[str, list[tasks.MCItem]]
    """"settled", "unsettled", "utility" -> items (gold option in `answer`)."""
    captions: list[tuple[str, Scene]]
    """(AMBER image file name, scene)."""
    bbq: list[dict]
    """BBQ records."""


def benchmarks(seed: int = 0, n_pope_images: int = 200, n_mc: int = 240, n_captions: int = 100) -> Benchmarks:
    """Generate every toy benchmark for `seed` (deterministic)."""
    rng = random.Random(f"toy-data:{seed}:pope")
    pope_scenes = {f"toy_pope_{i + 1:05d}.png": sample_scene(rng) for i in range(n_pope_images)}
    pope = {split: pope_records(pope_scenes, split, random.Random(f"toy-data:{seed}:pope:{split}")) for split in POPE_SPLITS}

    def mc_items(kind: str, n: int) -> list[tasks.MCItem]:
        rng = random.Random(f"toy-data:{seed}:{kind}")
        if kind == "utility":
            return [tasks.utility_item(rng, tasks.UTILITY[i % len(tasks.UTILITY)]) for i in range(n)]
        make, names = (tasks.settled_item, tasks.SETTLED) if kind == "settled" else (tasks.unsettled_item, tasks.UNSETTLED)
        items = []
        while len(items) < n:
            scene = sample_scene(rng)
            task = names[len(items) % len(names)]
            items.append(make(rng, scene, task))
        return items

    rng = random.Random(f"toy-data:{seed}:captions")
    captions = [(f"AMBER_{i + 1}.png", sample_scene(rng)) for i in range(n_captions)]
    return Benchmarks(
        pope_scenes=pope_scenes,
        pope=pope,
        mc={kind: mc_items(kind, n_mc) for kind in ("settled", "unsettled", "utility")},
        captions=captions,
        bbq=bbq_records(seed),
    )


def pope_records(scenes: dict[str, Scene], split: str, rng: random.Random, per_image: int = 3) -> list[dict]:
    """POPE questions as POPE builds them: up to `per_image` present objects ("yes") and as many absent
    ones ("no") per image. Absent objects are drawn at random (random), the most frequent objects of
    the image set (popular) or the objects that co-occur most with the present ones (adversarial)."""
    freq: Counter = Counter()
    co: Counter = Counter()
    for scene in scenes.values():
        freq.update(scene.names)
        co.update((a, b) for a in scene.names for b in scene.names if a != b)
    records = []
    for image, scene in scenes.items():
        present = scene.names
        yes = rng.sample(present, min(per_image, len(present)))
        absent = [o for o in OBJECTS if o not in present]
        if split == "random":
            no = rng.sample(absent, len(yes))
        elif split == "popular":
            no = sorted(absent, key=lambda o: (-freq[o], OBJECTS.index(o)))[: len(yes)]
        elif split == "adversarial":
            no = sorted(absent, key=lambda o: (-sum(co[p, o] for p in present), -freq[o], OBJECTS.index(o)))[: len(yes)]
        else:
            raise ValueError(f"POPE split must be one of {POPE_SPLITS}, got {split!r}")
        for name, label in [(n, "yes") for n in yes] + [(n, "no") for n in no]:
            records.append({"question_id": len(records) + 1, "image": image, "text": tasks.pope_question(name), "label": label})
    return records


def bbq_records(seed: int = 0, nouns_per_scenario: int = 3) -> list[dict]:
    """A balanced BBQ set: every scenario x noun x name order x polarity, ambiguous (two phrasings of
    "unknown") and disambiguated (each group as the culprit); option order shuffled."""
    rng = random.Random(f"toy-data:{seed}:bbq")
    records = []
    for scenario in range(len(tasks.SCENARIOS)):
        for noun in rng.sample(tasks.NOUNS, nouns_per_scenario):
            for first in tasks.GROUPS:
                for polarity in ("neg", "nonneg"):
                    variants = [("ambig", g) for g in tasks.GROUPS] + [("disambig", g) for g in tasks.GROUPS]
                    for condition, culprit in variants:
                        order = [0, 1, 2]
                        rng.shuffle(order)
                        records.append(tasks.bbq_item(len(records), scenario, noun, first, polarity, condition,
                                                      culprit, rng.choice(tasks.UNKNOWNS), order))
    return records


# --- writers --------------------------------------------------------------------------------------

def write_pope(out: Path, bench: Benchmarks) -> dict[str, Path]:
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    for name, scene in bench.pope_scenes.items():
        render(scene).save(images / name)
    files = {}
    for split, records in bench.pope.items():
        files[split] = out / f"toy_pope_{split}.jsonl"
        files[split].write_text("".join(json.dumps(r) + "\n" for r in records))
    return files


def write_scienceqa(root: Path, items: list[tasks.MCItem], subject: str) -> Path:
    """ScienceQA's layout: problems.json {pid: record}, pid_splits.json, images/test/<pid>/image.png."""
    problems = {}
    for i, item in enumerate(items):
        pid = str(i + 1)
        if item.scene is not None:
            folder = root / "images" / "test" / pid
            folder.mkdir(parents=True, exist_ok=True)
            render(item.scene).save(folder / "image.png")
        problems[pid] = {
            "question": item.question,
            "choices": item.choices,
            "answer": item.answer,
            "hint": item.context or "",
            "image": "image.png" if item.scene is not None else None,
            "task": "closed choice",
            "grade": "grade1",
            "subject": subject,
            "topic": "toy world",
            "category": f"toy {subject}",
            "skill": item.task,
            "lecture": "",
            "solution": "",
            "split": "test",
        }
    root.mkdir(parents=True, exist_ok=True)
    (root / "problems.json").write_text(json.dumps(problems, indent=1))
    splits = {s: [] for s in ("train", "val", "minitrain", "minival", "minitest", "trainval")}
    splits["test"] = list(problems)
    (root / "pid_splits.json").write_text(json.dumps(splits))
    return root / "problems.json"


def write_amber(out: Path, bench: Benchmarks) -> Path:
    """AMBER's generative task: query_generative.json, annotations.json (truth / hallu objects), images."""
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    co: Counter = Counter()
    for _, scene in bench.captions:
        co.update((a, b) for a in scene.names for b in scene.names if a != b)
    queries, annotations = [], []
    for i, (image, scene) in enumerate(bench.captions):
        render(scene).save(images / image)
        absent = [o for o in OBJECTS if o not in scene.names]
        partners = tasks.absent_partners(scene)
        likely = sorted(absent, key=lambda o: (o not in partners, -sum(co[p, o] for p in scene.names), OBJECTS.index(o)))
        queries.append({"id": i + 1, "image": image, "query": tasks.CAPTION_QUERY})
        annotations.append({"id": i + 1, "type": "generative", "truth": scene.names, "hallu": likely[:5]})
    (out / "query_generative.json").write_text(json.dumps(queries, indent=1))
    (out / "annotations.json").write_text(json.dumps(annotations, indent=1))
    (out / "relation.json").write_text(json.dumps({o: [] for o in OBJECTS}, indent=1))
    (out / "safe_words.txt").write_text("")
    return out / "query_generative.json"


def write_bbq(out: Path, bench: Benchmarks) -> Path:
    path = out / "data" / "Nationality.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in bench.bbq))
    return path


def toy_data(out: str, seed: int = 0, scale: float = 1.0) -> Path:
    """Write every toy benchmark for `seed` under `out` and return the path of out/manifest.json.

    Args:
        out: output directory
        seed: seed of the scenes and items
        scale: size relative to the default (200 POPE images, 240 items per multiple-choice kind, 100 captions)
    """
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    root = Path(out).resolve()
    bench = benchmarks(seed, n_pope_images=max(4, round(200 * scale)), n_mc=max(4, round(240 * scale)),
                       n_captions=max(4, round(100 * scale)))
    pope = write_pope(root / "pope", bench)
    sqa = {kind: write_scienceqa(root / "scienceqa" / kind, bench.mc[kind],
                                 "language science" if kind == "utility" else "natural science")
           for kind in ("settled", "unsettled", "utility")}
    amber = write_amber(root / "amber", bench)
    bbq = write_bbq(root / "bbq", bench)

    def entry(bench_name: str, files: list[Path], data: Path, images: Path | None = None) -> dict:
        cmd = f"llava-circuits eval {bench_name} --model {{model}} --data {data}"
        if images is not None:
            cmd += f" --images {images}"
        return {"files": [str(f) for f in files], "eval": cmd + " --out {out}"}

    manifest = {f"pope_{split}": entry("pope", [pope[split], root / "pope" / "images"], pope[split], root / "pope" / "images")
                for split in POPE_SPLITS}
    for key, kind in (("mc_settled", "settled"), ("mc_unsettled", "unsettled"), ("utility", "utility")):
        folder = sqa[kind].parent
        images = folder / "images" if (folder / "images").exists() else None  # utility is text-only
        files = [sqa[kind], folder / "pid_splits.json"] + ([images] if images else [])
        manifest[key] = entry("scienceqa", files, sqa[kind], images)
    for key in ("mc_settled", "mc_unsettled"):  # every gold position, and permutation_std, need all rotations
        manifest[key]["eval"] = manifest[key]["eval"].replace(" --out", " --permutations --out")
    manifest["captions"] = entry("amber", [amber, root / "amber" / "annotations.json", root / "amber" / "images"],
                                 amber, root / "amber" / "images")
    manifest["bbq"] = entry("bbq", [bbq], bbq)
    path = root / "manifest.json"
    path.write_text(json.dumps(manifest, indent=1))
    return path
