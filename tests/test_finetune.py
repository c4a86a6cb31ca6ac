import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from llava_circuits.finetune import FinetuneConfig, FinetuneModule, SFTCollator, example_mean_loss, warmup_cosine
from llava_circuits.toy.model import ToyModelConfig, build_model
from llava_circuits.toy.processor import build_processor, format_prompt
from llava_circuits.toy.scenes import render, scene_from_seed
from llava_circuits.toy.tokenizer import build_tokenizer
from llava_circuits.toy.train import ToyDataConfig, ToyDataModule

TINY = ToyModelConfig(vision_width=32, vision_layers=2, vision_heads=2, vision_mlp=32,
                      text_width=32, text_layers=2, text_heads=2, text_kv_heads=2, text_mlp=64)


@pytest.fixture(scope="module")
def processor():
    return build_processor(build_tokenizer())


def examples():
    return [
        {"prompt": format_prompt("Is there a cup in the image?"), "answer": "Yes", "image": render(scene_from_seed(1))},
        {"prompt": format_prompt("What number comes after two?\n(A) three\n(B) one", image=False), "answer": "A", "image": None},
        {"prompt": format_prompt("Describe this image."), "answer": "There is a red ball.", "image": render(scene_from_seed(2))},
    ]


@pytest.mark.parametrize("side", ["right", "left"])
def test_labels_cover_answer_tokens_only(processor, side):
    tok = processor.tokenizer
    batch = SFTCollator(processor, padding_side=side)(examples())
    assert batch["pixel_values"].shape == (2, 3, 64, 64)
    for row, ex in enumerate(examples()):
        ids, labels, mask = batch["input_ids"][row], batch["labels"][row], batch["attention_mask"][row]
        answer = tok(ex["answer"], add_special_tokens=False).input_ids + [tok.eos_token_id]
        assert labels[labels != -100].tolist() == answer
        assert ids[labels != -100].tolist() == answer  # labels sit on the answer tokens themselves
        assert (labels[mask == 0] == -100).all() and (ids[mask == 0] == tok.pad_token_id).all()
        real = mask.nonzero().flatten()
        assert real.max() - real.min() + 1 == len(real)  # padding only on one side
        assert (real.min() == 0) if side == "right" else (real.max() == ids.shape[0] - 1)
        assert ids[real[0]] == tok.bos_token_id
    assert (batch["input_ids"] == 4).sum() == 32  # two images x 16 image tokens


def test_loss_ignores_prompt_tokens(processor):
    model = build_model(processor.tokenizer, TINY)
    batch = SFTCollator(processor)(examples())
    out = model(**batch)
    target = batch["labels"][:, 1:]  # the token each position predicts
    mask = target != -100
    manual = torch.nn.functional.cross_entropy(out.logits[:, :-1][mask], target[mask])
    assert torch.allclose(out.loss, manual, atol=1e-5)
    assert mask.sum() == sum(len(processor.tokenizer(ex["answer"], add_special_tokens=False).input_ids) + 1
                             for ex in examples())


def test_example_loss_weighs_each_example_equally(processor):
    model = build_model(processor.tokenizer, TINY).double()
    batch = SFTCollator(processor)(examples())
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    by_hand = []
    for row in range(len(examples())):  # the mean of each example's own answer-token loss, one at a time
        target, pred = batch["labels"][row, 1:], logits[row, :-1]
        keep = target != -100
        by_hand.append(torch.nn.functional.cross_entropy(pred[keep], target[keep]))
    assert torch.allclose(example_mean_loss(logits, batch["labels"]), torch.stack(by_hand).mean(), atol=1e-10)
    module = FinetuneModule(model, FinetuneConfig(loss_per="example"))
    assert torch.allclose(module.training_step(batch, 0), torch.stack(by_hand).mean(), atol=1e-10)
    with pytest.raises(ValueError, match="loss_per"):
        FinetuneModule(model, FinetuneConfig(loss_per="tokens"))


def test_warmup_cosine_schedule():
    assert warmup_cosine(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(100, 10, 100, 0.1) == pytest.approx(0.1)
    assert 0.1 < warmup_cosine(55, 10, 100, 0.1) < 1.0


def test_only_parameters_with_requires_grad_are_trained(processor):
    model = build_model(processor.tokenizer, TINY)
    gate = torch.nn.Parameter(torch.ones(TINY.text_heads), requires_grad=False)  # a frozen extra, e.g. a pruning gate
    model.register_parameter("head_gate", gate)
    model.model.vision_tower.requires_grad_(False)
    module = FinetuneModule(model, FinetuneConfig(lr=1e-2, warmup_steps=1))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    loader = DataLoader([examples()], batch_size=None, collate_fn=SFTCollator(processor))
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, loader)
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], p) for n, p in frozen.items())
    assert any(not torch.equal(params[n], p) for n, p in trainable.items())


def _fit(processor, root, max_steps, ckpt_path=None, seen=None):
    torch.manual_seed(0)
    model = build_model(processor.tokenizer, TINY, seed=0)
    module = FinetuneModule(model, FinetuneConfig(lr=3e-3, warmup_steps=2, total_steps=6))
    data = ToyDataModule(processor, ToyDataConfig(seed=7), batch_size=4, max_steps=6)
    if seen is not None:
        collate = data.collate
        data.collate = lambda batch: (seen.append(batch[0]["prompt"]), collate(batch))[1]
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False,
                        callbacks=[ModelCheckpoint(dirpath=root, save_last=True, every_n_train_steps=1)])
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return trainer, module


def test_resume_from_last_continues_at_the_same_step_and_data(processor, tmp_path):
    straight_seen: list[str] = []
    _, straight = _fit(processor, tmp_path / "straight", 6, seen=straight_seen)

    first_seen: list[str] = []
    trainer, _ = _fit(processor, tmp_path / "resumed", 3, seen=first_seen)
    assert trainer.global_step == 3 and (tmp_path / "resumed" / "last.ckpt").exists()
    second_seen: list[str] = []
    trainer, resumed = _fit(processor, tmp_path / "resumed", 6, ckpt_path="last", seen=second_seen)
    assert trainer.global_step == 6
    assert first_seen[:3] + second_seen[:3] == straight_seen[:6]
    for (name, a), b in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.allclose(a, b, atol=1e-6), name
