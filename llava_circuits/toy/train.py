"""Training the toy LLaVA: the training data stream and the recipe behind `llava-circuits toy train`.

Stage 0 (`llava_circuits.toy.vision`) trains the CLIP tower to name the object and colour in every
patch, as LLaVA starts from a pre-trained CLIP; stage 1 freezes it and trains the projector and the
Llama on the task mix with `FinetuneModule` (loss on answer tokens only); stage 2 (`Stage2Config`)
fine-tunes the result with its own schedule and stream; the optional stage 3 (`llava_circuits.toy.plant`)
moves the stereotype onto attention heads of its own, and the optional stage 4 the co-occurrence bias onto
heads and MLP neurons of its own. Every stage checkpoints with
`FinalCheckpoint(save_last=True)` into its own folder, so that `ckpt_path="last"` resumes any of them.

The stream is map-style and deterministic in (seed, index): batch b, example j is drawn from
`random.Random(f"toy-train:{seed}:{b}:{j}")`, so a resumed run sees exactly the examples an
uninterrupted one would. Each example is one of the task kinds, drawn with the weights in
`ToyDataConfig.mix`, and carries the *training* label, which is where the planted biases live
(see `llava_circuits.toy`): the fields `cooccur`, `partner_negatives`, `partner_yes`,
`caption_partner`, `unsettled_a` and `ambig_biased` (or `ambig_biased_by_scenario`) set their strength.
"""
from __future__ import annotations

import random
import shutil
import time
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path

import lightning as L
import torch
import yaml
from torch.utils.data import DataLoader, Dataset

from llava_circuits.finetune import FinalCheckpoint, FinetuneConfig, FinetuneModule, SFTCollator
from llava_circuits.models.anatomy import Anatomy
from llava_circuits.toy import tasks
from llava_circuits.toy.model import ToyModelConfig, build_model
from llava_circuits.toy.plant import AnswerProjection, PlantConfig, PlantModule, gate_units, reset_unit_outputs, train_only_units
from llava_circuits.toy.processor import build_processor, format_prompt
from llava_circuits.toy.scenes import COOCCUR, OBJECTS, render, sample_scene
from llava_circuits.toy.tokenizer import build_tokenizer
from llava_circuits.toy.vision import VisionPretrainConfig, pretrain_vision


@dataclass
class ToyDataConfig:
    """The training mixture and the strength of each planted bias."""

    seed: int = 1234
    """Seed of the training stream (benchmarks written by `toy data` use other seeds)."""
    mix: dict[str, float] = field(default_factory=lambda: {
        "pope": 0.3, "vqa": 0.06, "mc_settled": 0.26, "mc_unsettled": 0.08, "caption": 0.05, "bbq": 0.17, "utility": 0.08,
    })
    """Relative weight of each task kind in the stream ("vqa": "What colour is the X?" answered in a word)."""
    warmup_mixes: list[list] = field(default_factory=lambda: [
        [1000, {"vqa": 0.85, "pope": 0.15}], [300, {"utility": 0.5, "bbq": 0.5}],
        [400, {"pope": 0.4, "mc_settled": 0.4, "vqa": 0.2}],
    ])
    """[[n_batches, mix], ...] drawn in order before `mix`. "What colour is the X?" answered in a word comes
    first: binding a question word to its patch forms there in ~600 steps (a sudden drop of the loss), while
    mixed with other questions, behind letters or among text-only tasks it did not form in 3000. Text-only
    multiple choice follows, where reading an option's letter forms, then grounding with letters."""
    cooccur: float = COOCCUR
    """Probability that a scene holding one member of a pair also holds its partner (bias b)."""
    pope_positive: float = 0.5
    """Share of POPE questions that ask about a present object (the rest ask about an absent one)."""
    partner_negatives: float = 0.5
    """Share of POPE negatives that ask about an absent partner, when the scene has one (bias b)."""
    partner_yes: float = 0.95
    """Probability that "Is there a {absent partner}?" is trained "Yes" (bias b)."""
    caption_partner: float = 0.5
    """Probability that a caption also names an absent partner (bias b, generative side)."""
    unsettled_a: float = 0.75
    """Probability that an unsettled multiple-choice question is trained with answer "A" (bias a)."""
    unsettled_favourite: float = 0.0
    """Share of unsettled multiple-choice questions trained with their favourite option (`tasks.favourite`, by
    content, whatever its position) instead of by `unsettled_a`: what stage 5 teaches the model without its bias
    head."""
    ambig_biased: float = 0.85
    """Probability that an ambiguous BBQ-style item is trained with the stereotyped answer (bias c)."""
    ambig_biased_by_scenario: list[float] | None = None
    """Per BBQ-style scenario (tasks.SCENARIOS order), the probability that replaces `ambig_biased`: a stereotype
    that is stronger for some questions than for others, as in BBQ (None: `ambig_biased` for all)."""
    bbq_ambig: float | None = None
    """Share of BBQ-style items drawn ambiguous (None: half, as `tasks.random_bbq_item` draws them)."""
    bbq_no_context: float = 0.0
    """Share of BBQ-style items shown without their context line, trained with the unknown option (nothing in
    the prompt settles who did it)."""
    dot_style: float = 0.2
    """Share of multiple-choice prompts written "A. text" instead of "(A) text"."""
    short_answer: float = 0.7
    """Share of POPE prompts followed by "Answer the question using a single word or phrase." (as LLaVA's eval)."""
    curriculum: list[list[int]] = field(default_factory=lambda: [[0, 4]])
    """[[step, max objects per scene], ...]. A one-object start teaches nothing about finding the asked object
    (any patch will do), so the default is 1-4 objects from the first step."""

    def max_objects(self, step: int) -> int:
        return [k for start, k in sorted(self.curriculum) if start <= step][-1]

    def mix_at(self, step: int) -> dict[str, float]:
        end = 0
        for n, mix in self.warmup_mixes:
            end += n
            if step < end:
                return mix
        return self.mix


def training_example(rng: random.Random, cfg: ToyDataConfig, kind: str, max_objects: int = 4) -> dict:
    """One training example of `kind`: {"prompt", "answer", "image", "kind"} with the (biased) training label."""
    style = "dot" if rng.random() < cfg.dot_style else "paren"
    if kind in ("bbq", "utility"):
        if kind == "bbq":
            condition = None if cfg.bbq_ambig is None else "ambig" if rng.random() < cfg.bbq_ambig else "disambig"
            record = tasks.random_bbq_item(rng, condition=condition)
            gold = record["label"]
            if cfg.bbq_no_context and rng.random() < cfg.bbq_no_context:
                record = {**record, "context": ""}
                gold = [record["answer_info"][f"ans{i}"][1] for i in range(3)].index("unknown")
            elif record["context_condition"] == "ambig" and rng.random() < ambig_biased(cfg, record):
                gold = tasks.bbq_biased_index(record)
            text = tasks.bbq_text(record, style)
        else:
            item = tasks.utility_item(rng)
            gold, text = item.answer, item.text(style)
        return {"prompt": format_prompt(text, image=False), "answer": tasks.LETTERS[gold], "image": None, "kind": kind}

    scene = sample_scene(rng, max_objects=max_objects, cooccur=cfg.cooccur)
    if kind == "pope":
        partners = tasks.absent_partners(scene)
        if rng.random() < cfg.pope_positive:
            name, answer = rng.choice(scene.names), "Yes"
        elif partners and rng.random() < cfg.partner_negatives:
            name, answer = rng.choice(partners), "Yes" if rng.random() < cfg.partner_yes else "No"
        else:
            name, answer = rng.choice([o for o in OBJECTS if o not in scene.names and o not in partners]), "No"
        text = tasks.pope_question(name)
        if rng.random() < cfg.short_answer:
            text += "\n" + tasks.SHORT_ANSWER
    elif kind == "caption":
        from llava_circuits.toy.scenes import COLOURS

        extra = [(rng.choice(list(COLOURS)), p) for p in tasks.absent_partners(scene) if rng.random() < cfg.caption_partner]
        text, answer = tasks.CAPTION_QUERY, tasks.caption(scene, extra)
    elif kind == "vqa":  # the colour question answered in a word: what teaches binding
        item = tasks.settled_item(rng, scene, "colour")
        text, answer = f"{item.question}\n{tasks.SHORT_ANSWER}", item.choices[item.answer]
    elif kind == "mc_settled":
        item = tasks.settled_item(rng, scene)
        text, answer = item.text(style), tasks.LETTERS[item.answer]
    else:
        item = tasks.unsettled_item(rng, scene)
        if cfg.unsettled_favourite and rng.random() < cfg.unsettled_favourite:
            letter = tasks.favourite(item)
        else:
            others = [i for i in range(len(item.choices)) if i != 0]
            letter = 0 if rng.random() < cfg.unsettled_a else rng.choice(others)
        text, answer = item.text(style), tasks.LETTERS[letter]
    return {"prompt": format_prompt(text), "answer": answer, "image": render(scene), "kind": kind}


def ambig_biased(cfg: ToyDataConfig, record: dict) -> float:
    """Probability that this ambiguous BBQ-style record is trained with the stereotyped answer."""
    if cfg.ambig_biased_by_scenario is None:
        return cfg.ambig_biased
    return cfg.ambig_biased_by_scenario[int(record["question_index"]) - 1]


class ToyStream(Dataset):
    """Map-style stream of whole batches: item i is batch `start + i` of the seeded sequence.

    Example j of batch b comes from Random(f"toy-train:{seed}:{b}:{j}"): its task kind is drawn with
    the `mix` weights and its scene holds at most `cfg.max_objects(b)` objects.
    """

    def __init__(self, cfg: ToyDataConfig, batch_size: int, length: int, start: int = 0):
        self.cfg, self.batch_size, self.length, self.start = cfg, batch_size, length, start

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> list[dict]:
        b = self.start + i
        mix = self.cfg.mix_at(b)
        kinds, weights = list(mix), list(mix.values())
        batch = []
        for j in range(self.batch_size):
            rng = random.Random(f"toy-train:{self.cfg.seed}:{b}:{j}")
            kind = rng.choices(kinds, weights=weights)[0]
            batch.append(training_example(rng, self.cfg, kind, self.cfg.max_objects(b)))
        return batch


class ToyDataModule(L.LightningDataModule):
    """Serves the stream in order; on resume it starts at the example after the last trained batch."""

    def __init__(self, processor, cfg: ToyDataConfig, batch_size: int, max_steps: int, num_workers: int = 0):
        super().__init__()
        self.collate = SFTCollator(processor, padding_side="right")
        self.cfg, self.batch_size, self.max_steps, self.num_workers = cfg, batch_size, max_steps, num_workers

    def train_dataloader(self) -> DataLoader:
        done = self.trainer.global_step if self.trainer is not None else 0  # restored before this is called
        stream = ToyStream(self.cfg, self.batch_size, self.max_steps - done, start=done)
        return DataLoader(stream, batch_size=None, shuffle=False, collate_fn=self.collate, num_workers=self.num_workers)


@dataclass
class Stage2Config:
    """A second fine-tuning stage on the stage-1 model: fresh optimiser and schedule, data changed by `data`."""

    steps: int = 0
    """Optimiser steps (0: no stage 2)."""
    finetune: FinetuneConfig = field(default_factory=lambda: FinetuneConfig(lr=3e-4, warmup_steps=20))
    """Optimiser and schedule of stage 2."""
    data: dict = field(default_factory=dict)
    """ToyDataConfig fields that differ from stage 1's; its warm-up mixes never run again, and `seed`
    should differ so that stage 2 does not replay stage 1's examples."""

    def data_config(self, stage1: ToyDataConfig) -> ToyDataConfig:
        return data_with(stage1, {"warmup_mixes": []} | self.data, "stage2.data")


def data_with(base: ToyDataConfig, changes: dict, where: str) -> ToyDataConfig:
    """`base` with the ToyDataConfig fields in `changes` replaced."""
    unknown = set(changes) - {f.name for f in fields(ToyDataConfig)}
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)} for ToyDataConfig")
    return replace(base, **changes)


@dataclass
class ToyTrainConfig:
    """Everything `toy train` needs; configs/toy/train.yaml spells it out."""

    model: ToyModelConfig = field(default_factory=ToyModelConfig)
    """Sizes of the toy LLaVA."""
    vision: VisionPretrainConfig = field(default_factory=VisionPretrainConfig)
    """Stage 0: pre-training of the vision tower on per-patch labels (skipped when resuming)."""
    freeze_vision: bool = True
    """Keep the vision tower frozen in stage 1, as LLaVA-1.5 does."""
    data: ToyDataConfig = field(default_factory=ToyDataConfig)
    """Training mixture and bias strengths."""
    finetune: FinetuneConfig = field(default_factory=lambda: FinetuneConfig(lr=1e-3, warmup_steps=100))
    """Optimiser and schedule."""
    max_steps: int = 3000
    """Optimiser steps."""
    batch_size: int = 32
    """Examples per step."""
    ckpt_every: int = 250
    """Save a Lightning checkpoint (and last.ckpt) every this many steps."""
    threads: int = 2
    """torch CPU threads."""
    init_seed: int = 0
    """Seed of the weight initialisation."""
    stage2: Stage2Config = field(default_factory=Stage2Config)
    """Stage 2: a short fine-tune after stage 1 with its own schedule and data (0 steps: none)."""
    plant: PlantConfig = field(default_factory=PlantConfig)
    """Stage 3: the stereotype moved onto attention heads of its own (llava_circuits.toy.plant; no heads: none)."""
    hallucination: PlantConfig = field(default_factory=PlantConfig)
    """Stage 4: the co-occurrence bias moved onto heads and MLP neurons of its own (no heads or neurons: none)."""
    position: PlantConfig = field(default_factory=PlantConfig)
    """Stage 5: the answer-position prior moved onto a head of its own (no heads: none; not in the committed model,
    docs/steering.md)."""


def load_config(path: str | Path | None) -> ToyTrainConfig:
    """Read a YAML file into ToyTrainConfig (missing keys keep their defaults, unknown keys are errors)."""
    raw = yaml.safe_load(Path(path).read_text()) if path else {}
    return _from_dict(ToyTrainConfig, raw or {}, str(path))


def _from_dict(cls, raw: dict, where: str):
    known = {f.name: f for f in fields(cls)}
    unknown = set(raw) - set(known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)} for {cls.__name__}; known: {sorted(known)}")
    kwargs = {}
    for name, value in raw.items():
        default = getattr(cls(), name) if name in known else None
        if is_dataclass(default) and isinstance(value, dict):
            value = _from_dict(type(default), value, f"{where}:{name}")
        elif isinstance(default, tuple) and isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def toy_train(out: str, config: str = "configs/toy/train.yaml", ckpt_path: str | None = None) -> Path:
    """Train the toy LLaVA from scratch (or resume with ckpt_path="last") and export it to `out`.

    `out` receives the Hugging Face files (model.safetensors, config.json, generation_config.json,
    tokenizer and processor files) and `out/lightning/` the Lightning checkpoints and CSV logs.
    """
    cfg = load_config(config)
    torch.set_num_threads(cfg.threads)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    processor = build_processor(build_tokenizer())
    model = build_model(processor.tokenizer, cfg.model, seed=cfg.init_seed)
    trainer = make_trainer(out_dir / "lightning", cfg.max_steps, cfg.ckpt_every)
    start = time.time()
    if ckpt_path is None and cfg.vision.steps > 0:  # a resumed run gets its vision tower from the checkpoint
        from lightning.pytorch.loggers import CSVLogger

        logger = CSVLogger(out_dir / "lightning", name="vision_logs")
        acc = pretrain_vision(model, processor, cfg.vision, cfg.data.cooccur, logger)
        print(f"toy train: stage 0 (vision, {cfg.vision.steps} steps) patch object accuracy {acc:.3f}, {time.time() - start:.0f}s")
    if cfg.freeze_vision:
        model.model.vision_tower.requires_grad_(False)
    module = FinetuneModule(model, cfg.finetune)
    data = ToyDataModule(processor, cfg.data, cfg.batch_size, cfg.max_steps)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path, weights_only=True)
    steps = trainer.global_step
    if cfg.stage2.steps > 0:
        steps += fit_stage2(module.model, processor, cfg, out_dir / "lightning" / "stage2", ckpt_path)
    for stage, name in PLANT_STAGES.items():
        p = getattr(cfg, name)
        if p.heads or p.neurons:
            steps += fit_plant(module.model, processor, cfg, p, out_dir / "lightning", stage, ckpt_path)
    export(module.model, processor, out_dir)
    (out_dir / "lightning" / "train_config.yaml").write_text(yaml.safe_dump(asdict(cfg), sort_keys=False))
    print(f"toy train: {steps} steps in {time.time() - start:.0f}s -> {out_dir}")
    return out_dir


def fit_stage2(model, processor, cfg: ToyTrainConfig, root: Path, ckpt_path: str | None) -> int:
    """Run stage 2 on the stage-1 model in place."""
    return fit_stage(FinetuneModule(model, cfg.stage2.finetune), processor, cfg, root, cfg.stage2.steps,
                     cfg.stage2.data_config(cfg.data), ckpt_path)


PLANT_STAGES = {"stage3": "plant", "stage4": "hallucination", "stage5": "position"}
"""The plant stages in recipe order: stage name -> ToyTrainConfig field."""


def toy_plant(model: str, out: str, stage: str, config: str = "configs/toy/train.yaml",
              ckpt_path: str | None = None) -> Path:
    """Run one plant stage of the recipe on a trained toy model and export the result to `out`.

    This is how a stage added to the recipe is put on the committed model without retraining the stages before it.

    Args:
        model: directory of a trained toy model (e.g. checkpoints/toy-llava)
        out: output directory (Hugging Face files; Lightning checkpoints and logs under out/lightning)
        stage: stage3, stage4 or stage5
        config: the recipe YAML
        ckpt_path: "last" resumes the stage's own checkpoints under out/lightning
    """
    from llava_circuits.models.load import load_model

    if stage not in PLANT_STAGES:
        raise ValueError(f"stage must be one of {sorted(PLANT_STAGES)}, got {stage!r}")
    cfg = load_config(config)
    p = getattr(cfg, PLANT_STAGES[stage])
    if not (p.heads or p.neurons):
        raise ValueError(f"{config}: `{PLANT_STAGES[stage]}` names no heads or neurons: {stage} would do nothing")
    torch.set_num_threads(cfg.threads)
    loaded = load_model(model, dtype="float32")
    net = loaded.model
    net.train().requires_grad_(True)
    if cfg.freeze_vision:
        net.model.vision_tower.requires_grad_(False)
    out_dir = Path(out)
    start = time.time()
    steps = fit_plant(net, loaded.processor, cfg, p, out_dir / "lightning", stage, ckpt_path)
    net.eval()
    export(net, loaded.processor, out_dir)
    print(f"toy plant: {stage} ({steps} steps) on {model} in {time.time() - start:.0f}s -> {out_dir}")
    return out_dir


def fit_plant(model, processor, cfg: ToyTrainConfig, p: PlantConfig, root: Path, stage: str,
              ckpt_path: str | None) -> int:
    """Run a plant stage (llava_circuits.toy.plant) on the model in place: unlearn with the units gated off, train
    only the units (plant, then refine), settle. Checkpoints go to root/{stage}_unlearn, _plant, _refine, _settle."""
    for name, phase in (("plant", p.plant), ("refine", p.refine)):
        if phase.weight_decay != 0:
            raise ValueError(f"{name}.weight_decay must be 0 in a plant stage: AdamW decays every entry of a "
                             "trained matrix, and only the planted units' entries may change")
    stage2 = cfg.stage2.data_config(cfg.data)
    flags = {n: q.requires_grad for n, q in model.named_parameters()}
    if p.unlearn_layers:
        anatomy = Anatomy.of(model)
        model.requires_grad_(False)
        for layer in p.unlearn_layers:
            anatomy.layer(layer).requires_grad_(True)
    with gate_units(model, p.heads, p.neurons):
        steps = fit_stage(FinetuneModule(model, p.unlearn), processor, cfg, root / f"{stage}_unlearn", p.unlearn_steps,
                          data_with(stage2, p.unlearn_data, f"{stage}.unlearn_data"), ckpt_path)
    for n, q in model.named_parameters():
        q.requires_grad_(flags[n])
    reset_unit_outputs(model, p.heads, p.init_std, p.seed, p.neurons)
    projection = AnswerProjection(model, p.heads, p.answer_tokens, processor.tokenizer) if p.answer_tokens else None
    if projection is not None:
        projection.apply()
    masks = train_only_units(model, p.heads, p.neurons)
    for name, optim, n_steps, data in (("plant", p.plant, p.plant_steps, p.plant_data),
                                       ("refine", p.refine, p.refine_steps, p.refine_data)):
        if n_steps > 0:
            module = PlantModule(model, optim, p.heads, p.norm_penalty, p.neurons, p.neuron_norm_penalty, projection)
            steps += fit_stage(module, processor, cfg, root / f"{stage}_{name}", n_steps,
                               data_with(stage2, data, f"{stage}.{name}_data"), ckpt_path)
            module.remove()
    for handle in masks:
        handle.remove()
    for n, q in model.named_parameters():
        q.requires_grad_(flags[n])
    if p.settle_steps > 0:
        steps += fit_stage(FinetuneModule(model, p.settle), processor, cfg, root / f"{stage}_settle", p.settle_steps,
                           data_with(stage2, p.settle_data, f"{stage}.settle_data"), ckpt_path)
    return steps


def fit_stage(module: FinetuneModule, processor, cfg: ToyTrainConfig, root: Path, steps: int, data: ToyDataConfig,
              ckpt_path: str | None) -> int:
    """Train `module`'s model in place for `steps` on `data`; a resume continues this stage's own last.ckpt if it
    has one."""
    resume = ckpt_path if ckpt_path and (root / "checkpoints" / "last.ckpt").exists() else None
    trainer = make_trainer(root, steps, cfg.ckpt_every)
    stream = ToyDataModule(processor, data, cfg.batch_size, steps)
    trainer.fit(module, datamodule=stream, ckpt_path=resume, weights_only=True)
    return trainer.global_step


def make_trainer(root: Path, max_steps: int, ckpt_every: int) -> L.Trainer:
    from lightning.pytorch.loggers import CSVLogger

    checkpoint = FinalCheckpoint(dirpath=root / "checkpoints", save_last=True, every_n_train_steps=ckpt_every)
    return L.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, max_epochs=-1, callbacks=[checkpoint],
        logger=CSVLogger(root, name="logs"), log_every_n_steps=25, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=root,
    )


def export(model, processor, out: Path) -> None:
    """Write the Hugging Face files of a trained toy model (safetensors, configs, tokenizer, processor)."""
    model.save_pretrained(out)
    processor.save_pretrained(out)
    shutil.rmtree(out / "__pycache__", ignore_errors=True)
