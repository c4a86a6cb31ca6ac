import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from llava_circuits.cli import main
from llava_circuits.evaluation.run import evaluate_loaded
from llava_circuits.models.load import load_model
from llava_circuits.models.tiny import save_tiny, tiny_llama, tiny_llava
from llava_circuits.sites import intervene
from llava_circuits.steering.base import Intervention
from pope_reference import answers_and_labels, reference_pope

FIXTURES = Path(__file__).parents[1] / "fixtures"


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return save_tiny(tiny_llava(), tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny(tiny_llama(), tmp_path_factory.mktemp("tiny-llama"))


def pope_file(folder: Path, n: int, missing: set[int] = frozenset()) -> Path:
    """n POPE questions in the official format, images in folder/images but those of the `missing` indices."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        name = f"COCO_val2014_{i:012d}.jpg"
        if i not in missing:
            Image.new("RGB", (40, 40), (i * 7 % 255, 80, 160)).save(folder / "images" / name)
        lines.append(json.dumps({"question_id": i, "image": name, "text": "Is there a cat in the image?",
                                 "label": "yes" if i % 2 else "no"}))
    path = folder / "coco_pope_random.json"
    path.write_text("\n".join(lines) + "\n")
    return path


def ids_in(path: Path) -> list[str]:
    return [str(json.loads(line)["id"]) for line in path.read_text().splitlines()]


def test_missing_image_lands_in_errors_and_the_rest_finish(llava_dir, tmp_path):
    data = pope_file(tmp_path, 6, missing={2})
    out = tmp_path / "run"
    assert main(["eval", "pope", "--model", str(llava_dir), "--data", str(data), "--images", str(tmp_path / "images"),
                 "--out", str(out), "--batch_size", "4", "--max_new_tokens", "2"]) == 0
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [e["id"] for e in errors] == ["2"] and "COCO_val2014_000000000002.jpg" in errors[0]["error"]
    assert sorted(ids_in(out / "responses.jsonl"), key=int) == ["0", "1", "3", "4", "5"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"accuracy", "precision", "recall", "f1", "yes_ratio", "fp_rate"}
    run = json.loads((out / "run.json").read_text())
    assert run["answered"] == 5 and run["errors"] == 1 and "transformers" in run["versions"]


@pytest.mark.slow
def test_killed_eval_resumes_without_redoing_or_duplicating(llava_dir, tmp_path):
    data = pope_file(tmp_path, 120)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "llava_circuits.cli", "eval", "pope", "--model", str(llava_dir), "--data", str(data),
           "--images", str(tmp_path / "images"), "--out", str(out), "--batch_size", "1", "--max_new_tokens", "6"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    responses = out / "responses.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not responses.exists() or len(responses.read_text().splitlines()) < 10):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = responses.read_text().splitlines()
    assert 10 <= len(before) < 120, "the kill must land midway"
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    after = responses.read_text().splitlines()
    assert after[: len(before)] == before  # nothing redone or rewritten
    assert sorted(ids_in(responses), key=int) == [str(i) for i in range(120)]  # nothing lost or duplicated


def test_score_pope_equals_official_logic_on_200_answers(tmp_path):
    answers, labels = answers_and_labels(200)
    questions = tmp_path / "coco_pope_random.json"
    questions.write_text("".join(json.dumps({"question_id": i, "image": f"{i}.jpg", "text": "Is there a dog?",
                                             "label": label}) + "\n" for i, label in enumerate(labels)))
    answer_file = tmp_path / "answers.jsonl"
    answer_file.write_text("".join(json.dumps({"question_id": i, "text": a}) + "\n" for i, a in enumerate(answers)))
    assert main(["score", "pope", "--data", str(questions), "--responses", str(answer_file), "--out", str(tmp_path / "s")]) == 0
    assert json.loads((tmp_path / "s" / "metrics.json").read_text()) == reference_pope(answers, labels)


def test_score_rejects_an_answer_for_no_question(tmp_path, capsys):
    questions = tmp_path / "coco_pope_random.json"
    questions.write_text(json.dumps({"question_id": 1, "image": "a.jpg", "text": "Is there a dog?", "label": "no"}) + "\n")
    answers = tmp_path / "answers.jsonl"
    answers.write_text(json.dumps({"question_id": 1, "text": "No"}) + "\n" + json.dumps({"question_id": 9, "text": "No"}) + "\n")
    assert main(["score", "pope", "--data", str(questions), "--responses", str(answers), "--out", str(tmp_path / "s")]) == 2
    assert f"{answers}:2" in capsys.readouterr().err


def direct_loglik(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context) from one unbatched forward, in float64."""
    ctx = tokenizer(context)["input_ids"] or [tokenizer.bos_token_id]
    cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits.double(), -1)[0]
    return sum(logprobs[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont))


@pytest.mark.parametrize("bench, data", [("mmlu", "mmlu/data/test"), ("hellaswag", "hellaswag/hellaswag_val.jsonl")])
def test_loglik_benchmarks_on_a_tiny_llama(llama_dir, tmp_path, bench, data):
    from llava_circuits.data.readers import read_benchmark
    from llava_circuits.evaluation.tasks import task_for

    loaded = load_model(llama_dir, dtype="float32")
    metrics = evaluate_loaded(loaded, bench, FIXTURES / data, tmp_path, progress=False)
    assert set(metrics) == ({"accuracy"} if bench == "mmlu" else {"acc", "acc_norm"})
    task = task_for(bench)
    sample = read_benchmark(bench, FIXTURES / data)[0]
    record = json.loads((tmp_path / "responses.jsonl").read_text().splitlines()[0])
    expected = [direct_loglik(loaded.model, loaded.tokenizer, task.body(sample), c) for c in task.continuations(sample)]
    assert record["logliks"] == pytest.approx(expected, abs=1e-4)


class AddToResidual(Intervention):
    """A test intervention: adds a constant to a layer's residual stream."""

    kind = "test-add"

    def __init__(self, value: float):
        self.value, self.block = value, None

    def attach(self, loaded):
        self.block = intervene(loaded.model, {"layers.0.resid_post": lambda x: x + self.value})
        self.block.__enter__()

    def detach(self):
        self.block.__exit__(None, None, None)

    def describe(self):
        return {"kind": self.kind, "value": self.value}

    def save(self, path):
        raise AssertionError("not used")

    @classmethod
    def load(cls, path, loaded):
        raise AssertionError("not used")


def test_interventions_apply_during_eval_and_detach_after(llava_dir, tmp_path):
    data, images = pope_file(tmp_path, 4), tmp_path / "images"
    loaded = load_model(llava_dir, dtype="float32")
    base = evaluate_loaded(loaded, "pope", data, tmp_path / "base", images, progress=False, max_new_tokens=4)
    hooks = sum(len(m._forward_hooks) for m in loaded.model.modules())
    evaluate_loaded(loaded, "pope", data, tmp_path / "edited", images, [AddToResidual(50.0)], progress=False,
                    max_new_tokens=4)
    assert sum(len(m._forward_hooks) for m in loaded.model.modules()) == hooks
    base_answers = ids_and_answers(tmp_path / "base")
    assert base_answers != ids_and_answers(tmp_path / "edited")
    run = json.loads((tmp_path / "edited" / "run.json").read_text())
    assert run["interventions"] == [{"kind": "test-add", "value": 50.0}]
    again = evaluate_loaded(loaded, "pope", data, tmp_path / "again", images, progress=False, max_new_tokens=4)
    assert ids_and_answers(tmp_path / "again") == base_answers and again == base


class Interrupted(BaseException):
    """What the per-sample error handling lets through (as it lets a Ctrl-C through)."""


class FailsToAttach(AddToResidual):
    def attach(self, loaded):
        raise RuntimeError("cannot attach")


class InterruptsTheForward(AddToResidual):
    def attach(self, loaded):
        def stop(x):
            raise Interrupted("stopped")

        self.block = intervene(loaded.model, {"layers.0.resid_post": stop})
        self.block.__enter__()


@pytest.mark.parametrize("bad, error", [(FailsToAttach(0.0), RuntimeError), (InterruptsTheForward(0.0), Interrupted)])
def test_a_failed_eval_leaves_no_intervention_on_the_model(llava_dir, tmp_path, bad, error):
    data, images = pope_file(tmp_path, 4), tmp_path / "images"
    loaded = load_model(llava_dir, dtype="float32")
    evaluate_loaded(loaded, "pope", data, tmp_path / "base", images, progress=False, max_new_tokens=4)  # transformers' own hooks
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in loaded.model.modules())
    with pytest.raises(error):
        evaluate_loaded(loaded, "pope", data, tmp_path / "run", images, [AddToResidual(50.0), bad], progress=False,
                        max_new_tokens=4)
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in loaded.model.modules()) == hooks


def ids_and_answers(out: Path) -> dict:
    return {r["id"]: r["response"] for r in map(json.loads, (out / "responses.jsonl").read_text().splitlines())}


@pytest.mark.slow
def test_ddp_two_processes_give_the_metrics_of_one(llama_dir, tmp_path):
    data = FIXTURES / "mmlu" / "data" / "test"
    base = [sys.executable, "-m", "llava_circuits.cli", "eval", "mmlu", "--model", str(llama_dir), "--data", str(data)]
    subprocess.run([*base, "--out", str(tmp_path / "one")], check=True, capture_output=True)
    subprocess.run([*base, "--out", str(tmp_path / "two"), "--devices", "2"], check=True, capture_output=True)
    one, two = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert one == two
    assert sorted(ids_in(tmp_path / "two" / "responses.jsonl")) == sorted(ids_in(tmp_path / "one" / "responses.jsonl"))


def test_score_chair_counts_objects_of_the_reference_captions_as_truth():
    from llava_circuits.data.records import Sample
    from llava_circuits.evaluation.tasks import score_chair

    sample = Sample(id="1", question="Describe this image.", meta={"gt_objects": ["person"],
                                                                    "captions": ["A man with a dog in a park."]})
    scores = score_chair([sample], {"1": {"response": "A man walks his dog."}})
    assert scores["chair_i"] == 0.0 and scores["chair_s"] == 0.0  # the dog is in a reference caption (chair.py)
