"""TranscoderDataModule: deterministic in (seed, step), rank slices, resumable position, weights, sources."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from llava_circuits.models.tiny import tiny_processor
from llava_circuits.transcoders.data import TranscoderDataModule


def _dm(**kwargs):
    dm = TranscoderDataModule(model="unused", **{"batch_size": 4, **kwargs})
    dm.processor = tiny_processor()
    dm.setup()
    return dm


def test_batches_depend_only_on_seed_and_step():
    a, b = _dm(seed=3), _dm(seed=3)
    for step in (0, 5):
        x, y = a.batch(step), b.batch(step)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    assert not torch.equal(a.batch(0)["input_ids"][:, :10], a.batch(1)["input_ids"][:, :10])
    assert not torch.equal(a.batch(0)["input_ids"][:, :10], _dm(seed=4).batch(0)["input_ids"][:, :10])
    assert not torch.equal(a.batch(0, "val")["input_ids"][:, :10], a.batch(0)["input_ids"][:, :10])


def test_ranks_take_consecutive_slices_of_the_global_batch(monkeypatch):
    whole = _dm()
    rows = []
    for rank in (0, 1):
        dm = _dm()
        monkeypatch.setattr(dm, "_rank", lambda rank=rank: (rank, 2))
        rows.append(dm.batch(2))
    full = whole.batch(2)
    for r, part in enumerate(rows):
        for i in range(2):
            n = int(part["attention_mask"][i].sum())
            assert torch.equal(part["input_ids"][i, :n], full["input_ids"][2 * r + i, :n])
    dm = _dm(batch_size=3)
    monkeypatch.setattr(dm, "_rank", lambda: (0, 2))
    with pytest.raises(ValueError, match="divisible"):
        dm.batch(0)


def test_loader_starts_at_the_checkpointed_batch():
    dm = _dm()
    dm.load_state_dict({"next_batch": 7, "seed": 0, "batch_size": 4})
    first = next(iter(dm.train_dataloader()))
    assert torch.equal(first["input_ids"], dm.batch(7)["input_ids"])
    with pytest.raises(ValueError, match="resuming would change the batches"):
        dm.load_state_dict({"next_batch": 7, "seed": 1, "batch_size": 4})


def test_token_weights_exclude_padding_bos_and_weigh_image_tokens():
    dm = _dm(image_weight=0.25, text_weight=2.0, exclude_token_ids=[8])
    batch = dm.batch(0)
    ids, mask, w = batch["input_ids"], batch["attention_mask"], batch["token_weight"]
    tok = dm.processor.tokenizer
    assert torch.all(w[mask == 0] == 0)
    assert torch.all(w[ids == tok.bos_token_id] == 0)
    assert torch.all(w[ids == 8] == 0)
    image = (ids == dm.processor.image_token_id) & (mask == 1)
    assert image.any() and torch.all(w[image] == 0.25)
    other = (mask == 1) & ~image & (ids != tok.bos_token_id) & (ids != 8)
    assert torch.all(w[other] == 2.0)


def _image(path, seed):
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(path)


def test_instruct_source_reads_conversations_and_holds_out_validation(tmp_path):
    records = []
    for i in range(10):
        _image(tmp_path / f"{i}.png", i)
        turns = [{"from": "human", "value": "<image>\nis there a cat ?"}, {"from": "gpt", "value": "yes"},
                 {"from": "human", "value": "what colour ?"}, {"from": "gpt", "value": "red"}]
        records.append({"id": i, "image": f"{i}.png", "conversations": turns})
    (tmp_path / "data.json").write_text(json.dumps(records))
    dm = _dm(source="instruct", path=str(tmp_path / "data.json"), batch_size=2, val_batches=1)
    words = dm.processor.tokenizer.decode(dm.batch(0)["input_ids"][0]).split()
    assert words.index("cat") < words.index("yes") < words.index("colour") < words.index("red")  # both turns
    assert dm.batch(0)["pixel_values"].shape[0] == 2
    seen = {np.asarray(dm.example(i)["image"]).tobytes() for i in range(8)}
    held = {np.asarray(dm.example(i, "val")["image"]).tobytes() for i in range(2)}
    assert len(seen) == 8 and not seen & held


def test_caption_folder_with_metadata_or_sidecar_text(tmp_path):
    meta = tmp_path / "meta"
    meta.mkdir()
    for i in range(4):
        _image(meta / f"a{i}.png", i)
    lines = [json.dumps({"file_name": f"a{i}.png", "text": f"cat {i}"}) for i in range(4)]
    (meta / "metadata.jsonl").write_text("\n".join(lines))
    side = tmp_path / "side"
    side.mkdir()
    for i in range(4):
        _image(side / f"b{i}.png", i)
        (side / f"b{i}.txt").write_text("a red ball")
    for folder in (meta, side):
        dm = _dm(source="captions", path=str(folder), batch_size=2, val_batches=0)
        assert dm.example(0)["answer"] in {"cat 0", "cat 1", "cat 2", "cat 3", "a red ball"}
        assert dm.batch(0)["pixel_values"].shape[0] == 2
    with pytest.raises(ValueError, match="no metadata.jsonl"):
        _dm(source="captions", path=str(tmp_path), batch_size=2)
