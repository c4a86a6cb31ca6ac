"""A quick greedy scorer for the toy model on fresh toy benchmarks: the self-check of `toy train`.

It scores the in-memory items of `writers.benchmarks(seed)` (the same items `toy data` writes) by
the greedy first answer token, which is the model's whole answer for Yes/No and option letters.
Multiple choice is scored over every cyclic permutation of the options. The evaluation harness
(`llava-circuits eval`) is the reference; this exists so training can check its bars cheaply:

    python -m llava_circuits.toy.measure checkpoints/toy-llava --seed 1
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict

import torch

from llava_circuits.finetune import SFTCollator, pad, prompt_batches
from llava_circuits.toy import tasks
from llava_circuits.toy.processor import format_prompt
from llava_circuits.toy.scenes import OBJECTS, render
from llava_circuits.toy.writers import benchmarks


@torch.no_grad()
def first_tokens(model, processor, examples: list[dict], batch_size: int = 64) -> list[str]:
    """Greedy first answer token of each {"prompt", "image"} example."""
    answers = []
    for batch in prompt_batches(processor, examples, batch_size):
        logits = model(**batch).logits[:, -1]  # [batch, vocab]
        answers += processor.tokenizer.convert_ids_to_tokens(logits.argmax(-1).tolist())
    return answers


@torch.no_grad()
def captions(model, processor, scenes: list, max_new_tokens: int = 32) -> list[str]:
    collate = SFTCollator(processor)
    examples = [{"prompt": format_prompt(tasks.CAPTION_QUERY), "image": render(s)} for s in scenes]
    ids, pixel_values = collate.prompt_ids(examples)
    batch = pad(ids, ids, processor.tokenizer.pad_token_id, "left")
    del batch["labels"]
    out = model.generate(**batch, pixel_values=pixel_values, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)


def rotations(item: tasks.MCItem) -> list[tuple[list[str], int]]:
    n = len(item.choices)
    return [(item.choices[k:] + item.choices[:k], (item.answer - k) % n) for k in range(n)]


def score_mc(model, processor, items: list[tasks.MCItem]) -> dict:
    examples, golds, kinds = [], [], []
    for item in items:
        for choices, gold in rotations(item):
            kinds.append(item.task)
            text = tasks.mc_text(item.question, choices, item.context)
            image = render(item.scene) if item.scene is not None else None
            examples.append({"prompt": format_prompt(text, image is not None), "image": image})
            golds.append(gold)
    preds = first_tokens(model, processor, examples)
    by_pos = defaultdict(list)
    for pred, gold in zip(preds, golds):
        by_pos[tasks.LETTERS[gold]].append(pred == tasks.LETTERS[gold])
    acc = {k: sum(v) / len(v) for k, v in sorted(by_pos.items())}
    picks = {k: sum(p == k for p in preds) / len(preds) for k in sorted(by_pos)}
    by_task = defaultdict(list)
    for pred, gold, kind in zip(preds, golds, kinds):
        by_task[kind].append(pred == tasks.LETTERS[gold])
    return {
        "accuracy_by_task": {k: sum(v) / len(v) for k, v in sorted(by_task.items())},
        "accuracy": sum(sum(v) for v in by_pos.values()) / len(preds),
        "accuracy_by_gold_position": acc,
        "position_gap": max(acc.values()) - min(acc.values()),
        "pick_rate": picks,
        "n": len(preds),
    }


def score_pope(model, processor, bench, split: str) -> dict:
    records = bench.pope[split]
    examples = [{"prompt": format_prompt(r["text"]), "image": render(bench.pope_scenes[r["image"]])} for r in records]
    preds = first_tokens(model, processor, examples)
    said_yes = [p.lower() == "yes" for p in preds]
    gold_yes = [r["label"] == "yes" for r in records]
    negatives = [s for s, g in zip(said_yes, gold_yes) if not g]
    return {
        "accuracy": sum(s == g for s, g in zip(said_yes, gold_yes)) / len(records),
        "fp_rate": sum(negatives) / len(negatives),
        "recall": sum(s for s, g in zip(said_yes, gold_yes) if g) / sum(gold_yes),
        "yes_ratio": sum(said_yes) / len(records),
        "n": len(records),
    }


def score_bbq(model, processor, records: list[dict]) -> dict:
    examples = [{"prompt": format_prompt(tasks.bbq_text(r), image=False), "image": None} for r in records]
    preds = first_tokens(model, processor, examples)
    out = {}
    for condition in ("ambig", "disambig"):
        rows = [(r, p) for r, p in zip(records, preds) if r["context_condition"] == condition]
        right = sum(p == tasks.LETTERS[r["label"]] for r, p in rows)
        non_unknown = biased = 0
        for r, p in rows:
            if p not in tasks.LETTERS[:3]:
                continue
            idx = tasks.LETTERS.index(p)
            if r["answer_info"][f"ans{idx}"][1] == "unknown":
                continue
            non_unknown += 1
            biased += idx == tasks.bbq_biased_index(r)
        s_dis = 2 * biased / non_unknown - 1 if non_unknown else 0.0
        acc = right / len(rows)
        out[f"accuracy_{condition}"] = acc
        out[f"bias_score_{condition}"] = (1 - acc) * s_dis if condition == "ambig" else s_dis
    return out


def score_captions(model, processor, bench, n: int = 60) -> dict:
    scenes = [s for _, s in bench.captions[:n]]
    texts = captions(model, processor, scenes)
    mentioned = hallucinated = partner_captions = 0
    for scene, text in zip(scenes, texts):
        words = set(text.replace(".", " ").replace(",", " ").split())
        named = [o for o in OBJECTS if o in words]
        wrong = [o for o in named if o not in scene.names]
        mentioned += len(named)
        hallucinated += len(wrong)
        partner_captions += any(o in tasks.absent_partners(scene) for o in wrong)
    return {"chair_i": hallucinated / max(1, mentioned), "partner_hallucination_rate": partner_captions / len(scenes),
            "example": texts[0]}


def measure(model_dir: str, seed: int = 1) -> dict:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    return measure_model(model, processor, seed)


def measure_model(model, processor, seed: int = 1) -> dict:
    bench = benchmarks(seed)
    pope = {split: score_pope(model, processor, bench, split) for split in bench.pope}
    fig = {
        "pope": pope,
        "pope_fp_ratio_adversarial_vs_random": pope["adversarial"]["fp_rate"] / max(pope["random"]["fp_rate"], 1e-9),
        "mc_settled": score_mc(model, processor, bench.mc["settled"]),
        "mc_unsettled": score_mc(model, processor, bench.mc["unsettled"]),
        "utility": score_mc(model, processor, bench.mc["utility"]),
        "bbq": score_bbq(model, processor, bench.bbq),
        "captions": score_captions(model, processor, bench),
    }
    fig["bars"] = bars(fig)
    return fig


def bars(fig: dict) -> dict[str, bool]:
    """The toy world's acceptance bars (see llava_circuits.toy)."""
    return {
        "pope_random_accuracy>=0.95": fig["pope"]["random"]["accuracy"] >= 0.95,
        "pope_fp_adversarial>=3x_random": fig["pope_fp_ratio_adversarial_vs_random"] >= 3,
        "mc_settled_every_position>=0.95": min(fig["mc_settled"]["accuracy_by_gold_position"].values()) >= 0.95,
        "mc_unsettled_position_gap>=0.30": fig["mc_unsettled"]["position_gap"] >= 0.30,
        "bbq_bias_score_ambig>=0.5": fig["bbq"]["bias_score_ambig"] >= 0.5,
        "bbq_accuracy_disambig>=0.9": fig["bbq"]["accuracy_disambig"] >= 0.9,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--seed", type=int, default=1, help="benchmark seed (training uses its own stream)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(json.dumps(measure(args.model_dir, args.seed), indent=1))


if __name__ == "__main__":
    main()
