"""What each benchmark asks the model (a prompt to answer, or continuations to score) and how answers become metrics."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

from llava_circuits.data import prompts
from llava_circuits.data.records import Sample
from llava_circuits.metrics import (
    AmberMetric,
    BBQMetric,
    ChairMetric,
    CrowsPairsMetric,
    HellaSwagMetric,
    MMLUMetric,
    MultipleChoiceMetric,
    PopeMetric,
    StereoSetMetric,
    object_vocabulary,
    parse_choice_letter,
)

Responses = dict[str, dict]  # sample id -> its line of responses.jsonl
# Scores are computed on rank 0 from every rank's lines of responses.jsonl, so the metrics must not sync again.
LOCAL = {"sync_on_compute": False}


@dataclass(frozen=True)
class Task:
    """How one benchmark is run and scored."""

    name: str
    mode: str
    """"generate" (greedy answer text) or "loglik" (log-likelihood of each continuation)."""
    body: Callable[[Sample], str]
    """The prompt text inside the chat template (generate), or the context the continuations follow (loglik)."""
    score: Callable[[list[Sample], Responses], dict]
    """Metrics from the samples and their responses."""
    max_new_tokens: int = 16
    continuations: Callable[[Sample], list[str]] | None = None
    """The strings whose log-likelihood is scored after the body (loglik mode)."""
    reader: str | None = None
    """The reader of data/readers.py, when it is not named like the task."""


def predicted_letter(sample: Sample, response: dict) -> int | None:
    """The option index a generated answer names, or a loglik argmax; None when unparseable."""
    if "logliks" in response:
        scores = response["logliks"]
        return max(range(len(scores)), key=scores.__getitem__)
    if "prediction" in response:  # answers made elsewhere: a letter or an index
        pred = response["prediction"]
        return pred if isinstance(pred, int) else parse_choice_letter(str(pred), len(sample.choices or []))
    return parse_choice_letter(response["response"], len(sample.choices or []))


def scored(samples: list[Sample], responses: Responses) -> list[tuple[Sample, dict]]:
    return [(s, responses[s.id]) for s in samples if s.id in responses]


def score_pope(samples: list[Sample], responses: Responses) -> dict:
    by_split: dict[str, PopeMetric] = defaultdict(lambda: PopeMetric(**LOCAL))
    for sample, response in scored(samples, responses):
        by_split[sample.meta.get("split") or "all"].update([response["response"]], [sample.answer])
    results = {split: metric.compute() for split, metric in sorted(by_split.items())}
    return next(iter(results.values())) if len(results) == 1 else results


def score_multiple_choice(samples: list[Sample], responses: Responses) -> dict:
    metric = MultipleChoiceMetric(**LOCAL)
    for sample, response in scored(samples, responses):
        metric.update([predicted_letter(sample, response)], [sample.answer], permutation=sample.meta.get("permutation", 0))
    return metric.compute()


def score_bbq(samples: list[Sample], responses: Responses) -> dict:
    metric = BBQMetric(**LOCAL)
    for s, response in scored(samples, responses):
        pred = predicted_letter(s, response)
        metric.update([-1 if pred is None else pred], [s.answer], [s.meta["unknown_index"]], [s.meta["biased_index"]],
                      [s.meta["context_condition"]], [s.meta["category"]])
    return metric.compute()


def score_amber(samples: list[Sample], responses: Responses) -> dict:
    vocabulary = object_vocabulary({o for s in samples for o in [*s.meta.get("truth_objects", []), *s.meta.get("hallu_objects", [])]})
    metric = AmberMetric(vocabulary=vocabulary, **LOCAL)
    for s, response in scored(samples, responses):
        truth = s.answer if s.meta.get("type") == "discriminative" else s.meta.get("truth_objects", [])
        metric.update([response["response"]], [truth], [s.meta.get("hallu_objects", [])])
    return metric.compute()


def score_chair(samples: list[Sample], responses: Responses) -> dict:
    metric = ChairMetric(**LOCAL)
    for s, response in scored(samples, responses):
        # as chair.py: the objects the reference captions name join the ground truth
        metric.update([response["response"]], [set(s.meta["gt_objects"])], [s.meta.get("captions", [])])
    return metric.compute()


def score_mmlu(samples: list[Sample], responses: Responses) -> dict:
    metric = MMLUMetric(**LOCAL)
    for s, response in scored(samples, responses):
        metric.update([response["logliks"]], [s.answer])
    return metric.compute()


def score_hellaswag(samples: list[Sample], responses: Responses) -> dict:
    metric = HellaSwagMetric(**LOCAL)
    for s, response in scored(samples, responses):
        metric.update([response["logliks"]], [s.answer], [s.choices])
    return metric.compute()


def score_crows_pairs(samples: list[Sample], responses: Responses) -> dict:
    metric = CrowsPairsMetric(**LOCAL)
    for _, response in scored(samples, responses):
        more, less = response["logliks"]
        metric.update([more], [less])
    return metric.compute()


def score_stereoset(samples: list[Sample], responses: Responses) -> dict:
    """Sentences compete by mean log-likelihood per token, as StereoSet's own language-model scoring does."""
    metric = StereoSetMetric(**LOCAL)
    for s, response in scored(samples, responses):
        means = [ll / max(n, 1) for ll, n in zip(response["logliks"], response["n_tokens"])]
        metric.update([means[0]], [means[1]], [means[2]], [s.meta["target"]])
    return metric.compute()


def mmlu_body(s: Sample) -> str:
    """lm-evaluation-harness's zero-shot MMLU prompt."""
    subject = s.meta.get("subject", "").replace("_", " ")
    options = "\n".join(f"{prompts.LETTERS[i]}. {c}" for i, c in enumerate(s.choices or []))
    return f"The following are multiple choice questions (with answers) about {subject}.\n\n{s.question.strip()}\n{options}\nAnswer:"


def letters(s: Sample) -> list[str]:
    return [f" {prompts.LETTERS[i]}" for i in range(len(s.choices or []))]


TASKS: dict[str, Task] = {
    "pope": Task("pope", "generate", prompts.short_answer_body, score_pope, max_new_tokens=8),
    "scienceqa": Task("scienceqa", "generate", prompts.multiple_choice_body, score_multiple_choice, max_new_tokens=8),
    "bbq": Task("bbq", "generate", prompts.bbq_body, score_bbq, max_new_tokens=8),
    "amber": Task("amber", "generate", lambda s: s.question, score_amber, max_new_tokens=128),
    "chair": Task("chair", "generate", lambda s: s.question, score_chair, max_new_tokens=128),
    "mmlu": Task("mmlu", "loglik", mmlu_body, score_mmlu, continuations=letters),
    "hellaswag": Task("hellaswag", "loglik", lambda s: s.context or "", score_hellaswag,
                      continuations=lambda s: [f" {e}" for e in s.choices or []]),
    "crows_pairs": Task("crows_pairs", "loglik", lambda s: "", score_crows_pairs, continuations=lambda s: list(s.choices or [])),
    "stereoset": Task("stereoset", "loglik", lambda s: s.context or "", score_stereoset,
                      continuations=lambda s: [(" " if s.context else "") + c for c in s.choices or []]),
    "bbq_loglik": Task("bbq_loglik", "loglik", lambda s: prompts.bbq_body(s) + "\nAnswer:", score_bbq,
                       continuations=letters, reader="bbq"),
}


def task_for(bench: str) -> Task:
    key = bench.strip().lower().replace("-", "_")
    if key not in TASKS:
        raise ValueError(f"unknown benchmark {bench!r}; known: {', '.join(sorted(TASKS))}")
    return TASKS[key]
