"""features capture: the stored sparse activations are the replacement model's, tagged, and a killed run resumes."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

from llava_circuits.data.readers import read_benchmark
from llava_circuits.evaluation.module import format_prompt
from llava_circuits.evaluation.tasks import task_for
from llava_circuits.features.capture import (
    GENERATED,
    IMAGE,
    PROMPT,
    PositionTagger,
    capture_loaded,
)
from llava_circuits.features.config import CaptureConfig
from llava_circuits.features.store import captured_ids, iter_samples, read_meta, shards
from llava_circuits.sites import HookContext, Site, Step
from llava_circuits.transcoders.replacement import ReplacementModel

from .conftest import pope_file


def run_capture(tiny, tcs, pope_dir, out, batch_size=3, **kw):
    cfg = CaptureConfig(batch_size=batch_size, max_new_tokens=4, **kw)
    data = pope_dir / "coco_pope_random.json"
    return capture_loaded(tiny, ReplacementModel(tcs), "pope", data, out, pope_dir / "images", cfg)


def direct_activations(tiny, tcs, sample) -> dict[int, torch.Tensor]:
    """{layer: [positions, d_tc]} from one unpadded generate through the replacement model, recorded densely."""
    prompt = format_prompt(tiny, task_for("pope").body(sample), True)
    inputs = tiny.processor(text=[prompt], images=[Image.open(sample.image).convert("RGB")], return_tensors="pt")
    rm = ReplacementModel(tcs, record=True)
    with torch.no_grad():
        rm.generate(tiny, **inputs, max_new_tokens=4, do_sample=False, pad_token_id=tiny.tokenizer.pad_token_id)
    return {l: a[0] for l, a in rm.activations().items()}


def test_shards_hold_exactly_the_non_zero_activations_with_tags(tiny, tiny_transcoders, pope_dir, tmp_path):
    run_capture(tiny, tiny_transcoders, pope_dir, tmp_path / "run")
    samples = {s.id: s for s in read_benchmark("pope", pope_dir / "coco_pope_random.json", pope_dir / "images")}
    stored = list(iter_samples(tmp_path / "run"))
    assert sorted(s.id for s in stored) == sorted(samples)
    n_image = tiny.anatomy.n_image_tokens
    for acts in stored[:4]:
        direct = direct_activations(tiny, tiny_transcoders, samples[acts.id])
        n_pos = len(acts.tags)
        tags = acts.tags.tolist()
        assert tags.count(IMAGE) == n_image and tags.count(GENERATED) == 3  # 4 new tokens: 3 are fed back
        assert tags.index(GENERATED) == tags.count(IMAGE) + tags.count(PROMPT)  # prompt first, then generation
        for layer, dense in direct.items():
            assert dense.shape[0] == n_pos
            # batched (left-padded) capture vs an unpadded generate: same activations at every position
            torch.testing.assert_close(acts.dense(layer, tiny_transcoders.cfg.n_features), dense, atol=2e-4, rtol=1e-3)
        assert bool((acts.value != 0).all())  # only non-zero entries are stored


def test_storage_grows_with_active_features_not_layers_times_features(tiny, tiny_transcoders, pope_dir, tmp_path):
    run_capture(tiny, tiny_transcoders, pope_dir, tmp_path / "run", tags=["generated"])
    for acts in iter_samples(tmp_path / "run"):
        assert set(acts.tags[acts.position.long()].tolist()) <= {GENERATED}
        assert len(acts.value) < 0.9 * len(tiny_transcoders.layers) * tiny_transcoders.cfg.n_features * 3


def test_position_tagger_marks_padding_image_and_tokens_after_a_stop(tiny):
    tagger = PositionTagger(tiny)
    img, pad, stop = tiny.anatomy.image_token_id, tiny.tokenizer.pad_token_id, tagger.stops[0].item()
    ids = torch.tensor([[pad, pad, 5, img, img, 6], [4, 7, img, img, 8, 9]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    step = Step(ids, ids, mask, 0, 6)
    tag, real, index = tagger(HookContext(Site(0, "mlp.in"), step, (2, 6), None, "cpu"))
    assert real.tolist() == [[False, False, True, True, True, True], [True] * 6]
    assert tag[0, 2:].tolist() == [PROMPT, IMAGE, IMAGE, PROMPT] and index[0, 2:].tolist() == [0, 1, 2, 3]
    seq = torch.cat([ids, torch.tensor([[stop], [11]])], 1)  # row 0 generated a stop token, row 1 did not
    decode = Step(seq[:, -1:], seq, torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1), 6, 1)
    tag, real, index = tagger(HookContext(Site(0, "mlp.in"), decode, (2, 1), None, "cpu"))
    assert tag.tolist() == [[GENERATED], [GENERATED]] and real.tolist() == [[False], [True]]
    assert index.tolist() == [[4], [6]]


def test_a_run_killed_between_shard_and_responses_resumes_without_loss_or_repeat(tiny, tiny_transcoders, tmp_path,
                                                                                monkeypatch):
    from llava_circuits.features import capture as capture_mod

    pope_file(tmp_path / "pope", 10)
    pope_dir = tmp_path / "pope"
    full = tmp_path / "full"
    run_capture(tiny, tiny_transcoders, pope_dir, full, batch_size=2)
    calls = {"n": 0}
    original = capture_mod.BufferedLog.write

    def dies_on_the_fifth_line(self, record):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("killed")  # after the 3rd shard, before its 1st response line
        original(self, record)

    monkeypatch.setattr(capture_mod.BufferedLog, "write", dies_on_the_fifth_line)
    out = tmp_path / "resumed"
    with pytest.raises(RuntimeError, match="killed"):
        run_capture(tiny, tiny_transcoders, pope_dir, out, batch_size=2)
    assert len((out / "responses.jsonl").read_text().splitlines()) == 4 and len(shards(out)) == 3
    monkeypatch.setattr(capture_mod.BufferedLog, "write", original)
    run_capture(tiny, tiny_transcoders, pope_dir, out, batch_size=2)
    ids = captured_ids(out)
    assert sorted(ids, key=int) == [str(i) for i in range(10)]  # nothing lost, nothing twice
    lines = [json.loads(l)["id"] for l in (out / "responses.jsonl").read_text().splitlines()]
    assert sorted(lines, key=int) == [str(i) for i in range(10)]
    expected = {s.id: s for s in iter_samples(full)}
    for acts in iter_samples(out):
        torch.testing.assert_close(acts.value, expected[acts.id].value)
        assert torch.equal(acts.feature, expected[acts.id].feature) and torch.equal(acts.tags, expected[acts.id].tags)
    responses = {r["id"]: r for m in map(read_meta, shards(out)) for r in m["responses"]}
    assert set(responses) == set(lines)


CAPTURE_SCRIPT = """
import sys
from llava_circuits.features.capture import features_capture
features_capture("pope", sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], images=sys.argv[5], batch_size=2,
                 max_new_tokens=3, dtype="float32")
"""


@pytest.mark.slow
def test_a_sigkilled_capture_resumes_without_loss_or_repeat(tiny_dir, transcoders_dir, tmp_path):
    n = 40
    data = pope_file(tmp_path / "pope", n)
    out = tmp_path / "run"
    cmd = [sys.executable, "-c", CAPTURE_SCRIPT, str(tiny_dir), str(transcoders_dir), str(data), str(out),
           str(tmp_path / "pope" / "images")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    responses = out / "responses.jsonl"
    deadline = time.time() + 900  # generous: a loaded machine starts the model slowly
    while time.time() < deadline and (not responses.exists() or len(responses.read_text().splitlines()) < 8):
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = len(captured_ids(out))
    assert 8 <= before < n, "the kill must land midway"
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert sorted(captured_ids(out), key=int) == [str(i) for i in range(n)]
    lines = [json.loads(l)["id"] for l in responses.read_text().splitlines()]
    assert sorted(lines, key=int) == [str(i) for i in range(n)]
    capture = json.loads((out / "capture.json").read_text())
    assert capture["bench"] == "pope" and capture["samples"] == n


@pytest.mark.slow
def test_two_processes_shard_the_capture_and_store_each_sample_once(tiny_dir, transcoders_dir, tmp_path):
    n = 10
    data = pope_file(tmp_path / "pope", n)
    script = tmp_path / "capture.py"
    script.write_text(CAPTURE_SCRIPT.replace("dtype=\"float32\")", "dtype=\"float32\", devices=int(sys.argv[6]))"))
    for out, devices in (("one", 1), ("two", 2)):
        subprocess.run([sys.executable, str(script), str(tiny_dir), str(transcoders_dir), str(data), str(tmp_path / out),
                        str(tmp_path / "pope" / "images"), str(devices)], check=True, capture_output=True)
    two = tmp_path / "two"
    assert sorted(captured_ids(two), key=int) == [str(i) for i in range(n)]
    assert {p.name.split("-")[1] for p in shards(two)} == {"r0", "r1"}  # both ranks wrote shards
    assert len((two / "responses.jsonl").read_text().splitlines()) == n
    one = {s.id: s for s in iter_samples(tmp_path / "one")}
    for acts in iter_samples(two):
        for layer in (0, 2):
            torch.testing.assert_close(acts.dense(layer, 32), one[acts.id].dense(layer, 32), atol=2e-4, rtol=1e-3)


def test_one_bad_sample_costs_only_itself(tiny, tiny_transcoders, pope_dir, tmp_path, monkeypatch):
    from llava_circuits.evaluation.module import EvalModule, ResponseLog

    answer = EvalModule.generate

    def generate(self, items):  # the batch holding sample "1" fails, then "1" fails alone
        if any(s.id == "1" for s, _ in items):
            raise ValueError("bad sample 1")
        return answer(self, items)

    monkeypatch.setattr(EvalModule, "generate", generate)
    run_capture(tiny, tiny_transcoders, pope_dir, tmp_path / "run")
    ids = {s.id for s in read_benchmark("pope", pope_dir / "coco_pope_random.json", pope_dir / "images")}
    log = ResponseLog(tmp_path / "run")
    assert set(log.read("errors")) == {"1"}
    assert set(captured_ids(tmp_path / "run")) == ids - {"1"}
    assert set(log.read("responses")) == ids - {"1"}


def test_resuming_with_other_settings_is_refused_before_anything_mixes(tiny, tiny_transcoders, pope_dir, tmp_path):
    cfg = CaptureConfig(batch_size=3, max_new_tokens=4)
    data = pope_dir / "coco_pope_random.json"
    capture_loaded(tiny, ReplacementModel(tiny_transcoders), "pope", data, tmp_path / "run", pope_dir / "images", cfg, limit=3)
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    other = CaptureConfig(batch_size=3, max_new_tokens=4, tags=["prompt"])
    with pytest.raises(ValueError, match=r"capture\.json: this run's tags \['prompt'\] differs from the stored"):
        capture_loaded(tiny, ReplacementModel(tiny_transcoders), "pope", data, tmp_path / "run", pope_dir / "images", other)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before
    capture_loaded(tiny, ReplacementModel(tiny_transcoders), "pope", data, tmp_path / "run", pope_dir / "images",
                   CaptureConfig(batch_size=2, max_new_tokens=4))  # more samples, other batches: a resume
    ids = {s.id for s in read_benchmark("pope", data, pope_dir / "images")}
    assert set(captured_ids(tmp_path / "run")) == ids
