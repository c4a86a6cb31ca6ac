import json
import logging
import os
from pathlib import Path

import lightning as L
import pytest
import torch
from huggingface_hub import HfApi
from huggingface_hub.errors import RepositoryNotFoundError
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from safetensors.torch import save_file
from torch.utils.data import DataLoader, TensorDataset

from llava_circuits.artifacts import KINDS, ModelFingerprint, check_compatible, read_artifact, write_artifact
from llava_circuits.hub import PULL_MARKER, pull, push
from llava_circuits.hub_callback import HubPush

DIMS = {"n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "head_dim": 8, "d_model": 32, "d_mlp": 64}
FP = ModelFingerprint("llava-hf/llava-1.5-7b-hf", None, dict(DIMS))
HUB_FILES = {".gitattributes"}  # the Hub puts it in every new repo


def tree(root: Path) -> dict[str, bytes]:
    """Every file under root (relative path -> bytes), without pull/huggingface_hub metadata in .cache/."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root).parts[0] != ".cache"
    }


def pulled(root: Path) -> dict[str, bytes]:
    return {k: v for k, v in tree(root).items() if k not in HUB_FILES}


def make_artifact(path: Path, kind: str, seed: int = 0, **extra) -> Path:
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "transcoders": {
            f"layer_{i}": {"W_enc": torch.randn(16, 32, generator=g), "W_dec": torch.randn(16, 32, generator=g),
                           "b_enc": torch.zeros(16), "b_dec": torch.zeros(32)}
            for i in range(2)
        },
        "steerfair": {"directions": {"layer_1": torch.randn(3, 32, generator=g)}},
        "barrier": {"barrier": {"w": torch.randn(32, generator=g), "b": torch.tensor(0.5)}},
        "feature-analysis": {"stats": {"mean": torch.randn(2, 16, generator=g), "good": torch.tensor([1, 5, 7])}},
        "pruning": {"gates": {"heads": torch.rand(2, 4, generator=g)}},
        "attribution-graph": {"graph": {"adjacency": torch.randn(5, 5, generator=g)}},
    }[kind]
    files = {"graph.json": json.dumps({"nodes": list(range(seed + 3))})} if kind == "attribution-graph" else {}
    write_artifact(path, kind, FP, tensors, {"seed": seed}, {**files, **extra})
    return path


def make_model_dir(path: Path) -> Path:
    """A directory shaped like a saved Hugging Face model: config, weights, tokenizer files."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2}))
    save_file({"model.embed_tokens.weight": torch.randn(50, 32), "lm_head.weight": torch.randn(50, 32)},
              str(path / "model.safetensors"), metadata={"format": "pt"})
    tokenizer = {"version": "1.0", "model": {"type": "WordLevel", "vocab": {"a": 0}, "unk_token": "a"}}
    (path / "tokenizer.json").write_text(json.dumps(tokenizer))
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    (path / "special_tokens_map.json").write_text(json.dumps({"eos_token": "</s>"}))
    (path / "generation_config.json").write_text("{}")
    (path / "processor").mkdir()
    (path / "processor" / "preprocessor_config.json").write_text(json.dumps({"crop_size": 32}))
    (path / "processor" / "binary.dat").write_bytes(bytes(range(256)) * 4)  # binary without an LFS pattern
    return path


def commits(repo_id: str, revision: str = "main") -> list[str]:
    return [c.commit_id for c in HfApi().list_repo_commits(repo_id, revision=revision)]


@pytest.mark.parametrize("kind", KINDS)
def test_push_then_pull_round_trips_every_artifact_kind(tmp_path, hub_repo, kind):
    src = make_artifact(tmp_path / "src", kind)
    info = push(src, hub_repo)
    assert len(info.oid) == 40

    out = pull(hub_repo, out=tmp_path / "out")
    assert pulled(out) == tree(src)
    assert json.loads((out / PULL_MARKER).read_text()) == {"repo_id": hub_repo, "revision": "main", "commit": info.oid}
    cached = pull(hub_repo)
    assert cached.name == info.oid and pulled(cached) == tree(src)
    assert read_artifact(out, expected_kind=kind).config == {"seed": 0}


def test_push_then_pull_round_trips_a_model_directory(tmp_path, hub_repo):
    src = make_model_dir(tmp_path / "model")
    push(src, hub_repo)
    assert pulled(pull(hub_repo, out=tmp_path / "out")) == tree(src)
    lfs = {f.path: f.lfs is not None for f in HfApi().list_repo_tree(hub_repo, recursive=True) if hasattr(f, "lfs")}
    assert lfs["model.safetensors"] and lfs["processor/binary.dat"] and not lfs["config.json"]


def test_pushing_unchanged_files_makes_no_commit(tmp_path, hub_repo, hub):
    src = make_artifact(tmp_path / "src", "transcoders")
    first = push(src, hub_repo)
    history = commits(hub_repo)
    sent = len(hub.requests)

    again = push(src, hub_repo)
    assert again.oid == first.oid and commits(hub_repo) == history
    assert not [r for r in hub.requests[sent:] if r[0] == "POST" and "/commit/" in r[1]]

    (src / "notes.txt").write_text("one more file")
    third = push(src, hub_repo, commit_message="add notes")
    assert commits(hub_repo) == [third.oid, *history]
    assert [c.title for c in HfApi().list_repo_commits(hub_repo)][0] == "add notes"


def test_pulling_an_older_revision_returns_the_older_content(tmp_path, hub_repo):
    v1 = make_artifact(tmp_path / "v1", "attribution-graph", seed=1)
    old = tree(v1)
    c1 = push(v1, hub_repo)
    v2 = make_artifact(tmp_path / "v1", "attribution-graph", seed=2, **{"notes/v2.txt": "only in v2"})
    c2 = push(v2, hub_repo)
    assert c1.oid != c2.oid and tree(v2) != old

    assert pulled(pull(hub_repo, revision=c1.oid)) == old
    out = tmp_path / "out"
    assert pulled(pull(hub_repo, out=out)) == tree(v2)
    assert pulled(pull(hub_repo, revision=c1.oid, out=out)) == old  # replaces the previous pull: no v2 leftovers
    assert read_artifact(hub_repo, revision=c1.oid).config == {"seed": 1}
    assert read_artifact(hub_repo).config == {"seed": 2}

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("not a pull")
    with pytest.raises(FileExistsError):
        pull(hub_repo, out=tmp_path / "mine")
    assert (tmp_path / "mine" / "keep.txt").read_text() == "not a pull"


def test_push_to_a_branch_leaves_main_alone(tmp_path, hub_repo):
    main = push(make_artifact(tmp_path / "a", "steerfair", seed=1), hub_repo)
    branch = push(make_artifact(tmp_path / "b", "steerfair", seed=2), hub_repo, revision="experiment")
    assert commits(hub_repo, "experiment")[:2] == [branch.oid, main.oid]
    assert commits(hub_repo)[0] == main.oid
    assert read_artifact(hub_repo, revision="experiment").config == {"seed": 2}
    assert read_artifact(hub_repo).config == {"seed": 1}
    with pytest.raises(ValueError, match="push needs a branch name"):
        push(tmp_path / "a", hub_repo, revision=main.oid)


def test_private_repos_need_the_token(tmp_path, hub_repo, monkeypatch):
    push(make_artifact(tmp_path / "a", "barrier"), hub_repo, private=True)
    assert HfApi().model_info(hub_repo).private
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(RepositoryNotFoundError):
        pull(hub_repo, out=tmp_path / "out")


def test_an_artifact_pulled_elsewhere_checks_compatibility(tmp_path, hub_repo):
    made_for = ModelFingerprint("llava-hf/llava-1.5-7b-hf", None, {**DIMS, "d_model": 4096})
    tensors = {"layer_0": {"W_enc": torch.zeros(2, 4096)}}
    write_artifact(tmp_path / "machine_a" / "tc", "transcoders", made_for, tensors, {})
    push(tmp_path / "machine_a" / "tc", hub_repo)

    for art in (read_artifact(hub_repo, expected_kind="transcoders"),
                read_artifact(pull(hub_repo, out=tmp_path / "machine_b" / "tc"))):
        check_compatible(art, ModelFingerprint("/data/models/llava-1.5-7b-hf", None, {**DIMS, "d_model": 4096}))
        with pytest.raises(ValueError, match=r"artifact was made for d_model=4096, model has d_model=128$"):
            check_compatible(art, ModelFingerprint("llava-hf/llava-1.5-7b-hf", None, {**DIMS, "d_model": 128}))
        assert art.tensors("layer_0")["W_enc"].shape == (2, 4096)


def test_push_validates_an_artifact_and_refuses_files_holding_the_token(tmp_path, hub_repo, hf_token):
    art = make_artifact(tmp_path / "a", "barrier")
    (art / "artifact.json").write_text("{}")
    with pytest.raises(ValueError, match="missing field 'kind'"):
        push(art, hub_repo)
    model = make_model_dir(tmp_path / "model")
    (model / "processor" / "secrets.txt").write_text(f"HF_TOKEN={hf_token}\n")
    with pytest.raises(ValueError, match="contains your Hugging Face token") as e:
        push(model, hub_repo)
    assert hf_token not in str(e.value)
    from safetensors.torch import save_file

    shard = make_model_dir(tmp_path / "shards")
    save_file({"x": torch.zeros(2)}, str(shard / "shard-00000.safetensors"), metadata={"info": f"token {hf_token}"})
    with pytest.raises(ValueError, match="shard-00000.safetensors contains your Hugging Face token"):
        push(shard, hub_repo)
    with pytest.raises(NotADirectoryError):
        push(tmp_path / "missing", hub_repo)


# -- Lightning ------------------------------------------------------------------------------------------------


class Regression(L.LightningModule):
    def __init__(self, lr: float = 0.05):
        super().__init__()
        self.save_hyperparameters()
        self.linear = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.linear(x), y)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)  # momentum: state to resume


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g)), batch_size=2)


class StartStep(L.Callback):
    def on_train_start(self, trainer, pl_module):
        self.step = trainer.global_step


def fit(root: Path, max_steps: int, callbacks=(), ckpt_path=None, seed: int = 0) -> tuple[Regression, L.Trainer]:
    torch.manual_seed(seed)
    module = Regression()
    trainer = L.Trainer(
        default_root_dir=root, max_steps=max_steps, accelerator="cpu", devices=1, logger=CSVLogger(root),
        callbacks=[ModelCheckpoint(dirpath=root / "checkpoints"), *callbacks],
        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
    )
    trainer.fit(module, loader(), ckpt_path=ckpt_path, weights_only=True if ckpt_path else None)
    return module, trainer


@pytest.mark.slow
def test_a_run_resumes_elsewhere_from_the_checkpoint_hubpush_pushed(tmp_path, hub_repo):
    reference, _ = fit(tmp_path / "reference", max_steps=8)

    def artifact_fn(module, path):
        tensors = {"barrier": {"w": module.linear.weight.detach()}}
        write_artifact(path, "barrier", FP, tensors, {"step": module.global_step})

    push_every_3 = HubPush(hub_repo, every_n_steps=3, artifact_fn=artifact_fn)
    _, first = fit(tmp_path / "machine_a", max_steps=4, callbacks=[push_every_3])
    assert first.global_step == 4
    titles = [c.title for c in HfApi().list_repo_commits(hub_repo)]
    assert titles[:2] == ["HubPush: Regression at step 4", "HubPush: Regression at step 3"]
    assert not (tmp_path / "machine_a" / "hub_push").exists()  # staged pushes are cleaned up

    step3 = pull(hub_repo, revision=commits(hub_repo)[1])
    assert torch.load(step3 / "last.ckpt", weights_only=True)["global_step"] == 3
    assert read_artifact(step3).config == {"step": 3}

    pulled_dir = pull(hub_repo, out=tmp_path / "machine_b" / "pulled")
    start = StartStep()
    resumed, second = fit(tmp_path / "machine_b", 8, callbacks=[start], ckpt_path=pulled_dir / "last.ckpt", seed=1)
    assert start.step == 4 and second.global_step == 8
    for name, param in reference.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], param, rtol=0, atol=0)


@pytest.mark.slow
def test_the_token_appears_in_no_file_written_and_no_output(tmp_path, hub_repo, hf_token, capfd, caplog):
    caplog.set_level(logging.DEBUG)
    art = make_artifact(tmp_path / "artifact", "transcoders")
    push(art, hub_repo)
    push(art, hub_repo)  # the no-op path logs too
    pull(hub_repo, out=tmp_path / "pulled")
    read_artifact(hub_repo)
    push(make_model_dir(tmp_path / "model"), hub_repo, revision="model")
    fit(tmp_path / "run", max_steps=2, callbacks=[HubPush(hub_repo, every_n_steps=1)])
    pull(hub_repo, out=tmp_path / "resume")

    needle = hf_token.encode()
    roots = [tmp_path, Path(os.environ["HF_HOME"])]
    written = [p for root in roots for p in root.rglob("*") if p.is_file()]
    assert any(p.suffix == ".ckpt" for p in written) and any(p.name == "metrics.csv" for p in written)
    assert [p for p in written if needle in p.read_bytes()] == []
    out, err = capfd.readouterr()
    assert hf_token not in out and hf_token not in err
    assert hf_token not in caplog.text and caplog.records


def test_cli_push_and_pull_round_trip_the_toy_model_layout(tmp_path, hub_repo, hf_token, capsys):
    from llava_circuits.cli import main
    from llava_circuits.models.load import load_model
    from llava_circuits.models.tiny import save_tiny, tiny_llava

    model_dir = save_tiny(tiny_llava(), tmp_path / "model")
    assert main(["hub", "push", str(model_dir), hub_repo]) == 0
    assert main(["hub", "pull", hub_repo, "--out", str(tmp_path / "pulled")]) == 0
    assert hf_token not in capsys.readouterr().out
    for f in model_dir.iterdir():
        assert (tmp_path / "pulled" / f.name).read_bytes() == f.read_bytes()
    assert load_model(tmp_path / "pulled").anatomy.dims() == load_model(model_dir).anatomy.dims()


def test_a_failed_upload_during_training_is_logged_and_kept_and_training_goes_on(tmp_path, monkeypatch, caplog):
    import llava_circuits.hub_callback as hub_callback

    pushed = []

    def flaky_push(stage, repo_id, private=False, commit_message=""):
        if commit_message.endswith("step 2"):
            raise ConnectionError("503 from the hub")
        pushed.append(commit_message)

    monkeypatch.setattr(hub_callback, "push", flaky_push)
    _, trainer = fit(tmp_path / "run", max_steps=4, callbacks=[HubPush("user/run", every_n_steps=1)])
    assert trainer.global_step == 4
    assert pushed == [f"HubPush: Regression at step {s}" for s in (1, 3, 4)]
    assert (tmp_path / "run" / "hub_push" / "step-2" / "last.ckpt").is_file()  # kept, to push by hand
    assert not (tmp_path / "run" / "hub_push" / "step-3").exists()
    assert "503 from the hub" in caplog.text and "step-2" in caplog.text


def test_a_failed_final_upload_raises_and_names_the_kept_copy(tmp_path, monkeypatch):
    import llava_circuits.hub_callback as hub_callback

    def down(stage, repo_id, private=False, commit_message=""):
        raise ConnectionError("hub down")

    monkeypatch.setattr(hub_callback, "push", down)
    with pytest.raises(RuntimeError, match=r"final upload to user/run failed \(hub down\); it is kept in .*step-2"):
        fit(tmp_path / "run", max_steps=2, callbacks=[HubPush("user/run")])
    assert (tmp_path / "run" / "hub_push" / "step-2" / "last.ckpt").is_file()
