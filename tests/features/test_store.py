"""Sparse shards: round trip, and repair after a kill that cut responses.jsonl short."""
import json

import torch

from llava_circuits.evaluation.module import ResponseLog
from llava_circuits.features.store import (
    SampleActs,
    captured_ids,
    iter_samples,
    repair,
    shards,
    write_shard,
)


def sample(i: int) -> SampleActs:
    return SampleActs(str(i), torch.tensor([0, 0, 1, 2], dtype=torch.uint8), torch.tensor([0, 3], dtype=torch.int16),
                      torch.tensor([1, 3], dtype=torch.int32), torch.tensor([5, i], dtype=torch.int32),
                      torch.tensor([0.5, float(i)]))


def test_shards_round_trip_and_keep_rank_order(tmp_path):
    write_shard(tmp_path, 1, [sample(3)], [{"id": "3"}])
    write_shard(tmp_path, 0, [sample(1), sample(2)], [{"id": "1"}, {"id": "2"}], value_dtype="float16")
    write_shard(tmp_path, 0, [], [])
    assert [p.name for p in shards(tmp_path)] == ["acts-r0-000000.safetensors", "acts-r0-000001.safetensors",
                                                  "acts-r1-000000.safetensors"]
    back = {s.id: s for s in iter_samples(tmp_path)}
    assert captured_ids(tmp_path) == ["1", "2", "3"]
    for i in (1, 2, 3):
        ref = sample(i)
        assert torch.equal(back[str(i)].feature, ref.feature) and torch.equal(back[str(i)].tags, ref.tags)
        torch.testing.assert_close(back[str(i)].value.float(), ref.value)
    dense = back["2"].dense(3, 8)  # [positions, features]
    assert dense.shape == (4, 8) and dense[3, 2] == 2.0 and dense.sum() == 2.0
    assert back["2"].at(["generated"]).layer.tolist() == [3]  # position 3 is the generated one


def test_repair_restores_responses_a_kill_cut_off(tmp_path):
    records = [{"id": str(i), "response": f"answer {i}"} for i in range(4)]
    write_shard(tmp_path, 0, [sample(0), sample(1)], records[:2])
    write_shard(tmp_path, 0, [sample(2), sample(3)], records[2:])
    log = ResponseLog(tmp_path)
    (tmp_path / "responses.jsonl").write_text(json.dumps(records[0]) + "\n" + json.dumps(records[1])[:9])  # cut short
    (tmp_path / "acts" / ".acts-r0-000002.safetensors.tmp-99").write_bytes(b"half a file")
    assert repair(tmp_path, log) == 3
    assert sorted(log.read("responses")) == ["0", "1", "2", "3"]
    assert log.read("responses")["3"] == records[3]
    assert not list((tmp_path / "acts").glob(".*tmp*"))
    assert repair(tmp_path, log) == 0  # idempotent


def test_prompt_last_reads_only_the_last_prompt_position():
    tags = torch.tensor([0, 0, 1, 1, 1, 2, 2], dtype=torch.uint8)  # image, image, prompt x3, generated x2
    sample = SampleActs("s", tags, torch.tensor([0, 0, 1, 0, 1], dtype=torch.int16),
                        torch.tensor([1, 3, 4, 4, 5], dtype=torch.int32), torch.tensor([7, 2, 9, 3, 2], dtype=torch.int32),
                        torch.tensor([0.5, 1.0, 2.0, 3.0, 4.0]))
    assert sample.positions(["prompt_last"]).tolist() == [False, False, False, False, True, False, False]
    last = sample.at(["prompt_last"])
    assert last.position.tolist() == [4, 4] and last.feature.tolist() == [9, 3] and sample.n_positions(["prompt_last"]) == 1
    assert sample.n_positions(["prompt", "prompt_last"]) == 3 and sample.n_positions(["image", "generated"]) == 4
