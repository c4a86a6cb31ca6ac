import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from llava_circuits.artifacts import read_artifact
from llava_circuits.models.anatomy import Anatomy
from llava_circuits.models.load import Loaded
from llava_circuits.models.tiny import tiny_qwen2, tiny_tokenizer
from llava_circuits.sites import capture
from llava_circuits.steering.base import load_intervention
from llava_circuits.steering.callbacks import DemonstrationModule, SteeringFit, encode
from llava_circuits.steering.steerfair import (
    SteerFair,
    SteerFairConfig,
    combine_directions,
    demonstrations,
    rule_pca,
    top_heads,
)


def numpy_pca(x: np.ndarray) -> tuple[np.ndarray, float]:
    """First principal component (oriented towards the mean) and its explained-variance ratio, float64."""
    centred = x - x.mean(0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    v = vt[0] if vt[0] @ x.mean(0) >= 0 else -vt[0]
    return v, s[0] ** 2 / (s**2).sum()


def gram_schmidt(d: np.ndarray) -> np.ndarray:
    """Orthonormal basis of the rows of d, in order."""
    basis = []
    for v in d:
        w = v - sum((v @ b) * b for b in basis)
        basis.append(w / np.linalg.norm(w))
    return np.array(basis)


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def test_rule_pca_matches_numpy_float64():
    gen = torch.Generator().manual_seed(0)
    acts = torch.randn(40, 2, 3, 8, generator=gen) * torch.linspace(0.5, 3, 8) + 1.0  # [n, L, H, hd]
    rules = torch.arange(40) % 4
    components, ratios = rule_pca(acts, rules, 4)
    assert components.shape == (2, 3, 4, 8) and ratios.shape == (2, 3, 4)
    for layer in range(2):
        for head in range(3):
            for r in range(4):
                v, ratio = numpy_pca(acts[rules == r, layer, head].double().numpy())
                np.testing.assert_allclose(components[layer, head, r].numpy(), v, atol=1e-10)
                np.testing.assert_allclose(ratios[layer, head, r].item(), ratio, rtol=1e-12)


def test_combined_directions_match_numpy_float64():
    d = torch.randn(5, 4, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)  # [heads, R, hd]
    d = d / d.norm(dim=-1, keepdim=True)
    qr, mean, svd = (combine_directions(d, mode).numpy() for mode in ("qr", "mean", "svd"))
    for i, rows in enumerate(d.numpy()):
        np.testing.assert_allclose(qr[i], unit(gram_schmidt(rows).mean(0)), atol=1e-12)
        np.testing.assert_allclose(mean[i], unit(rows.mean(0)), atol=1e-12)
        _, _, vt = np.linalg.svd(rows, full_matrices=False)
        vt = vt * np.sign(vt @ rows.sum(0))[:, None]
        np.testing.assert_allclose(svd[i], unit(vt.mean(0)), atol=1e-12)


def test_top_heads_global_and_per_layer():
    importance = torch.tensor([[0.1, 0.9, 0.3], [0.8, 0.2, 0.7]])
    assert top_heads(importance, 3) == [(0, 1), (1, 0), (1, 2)]
    assert top_heads(importance, 1, per_layer=True) == [(0, 1), (1, 0)]


def fitted(loaded: Loaded, seed: int = 0, **config) -> SteerFair:
    """A SteerFair for the tiny model with random rule directions and importances."""
    a, gen = loaded.anatomy, torch.Generator().manual_seed(seed)
    rule_dirs = torch.randn(a.n_layers, a.n_heads, 4, a.head_dim, generator=gen, dtype=torch.float64)
    rule_dirs = rule_dirs / rule_dirs.norm(dim=-1, keepdim=True)
    explained = torch.rand(a.n_layers, a.n_heads, 4, generator=gen, dtype=torch.float64)
    return SteerFair(rule_dirs, explained, SteerFairConfig(**config), loaded.fingerprint())


@pytest.mark.parametrize("form", ["add", "project"])
def test_hook_changes_only_chosen_heads_at_last_positions_inside_generate(loaded, llava_inputs, form):
    model, a = loaded.model, loaded.anatomy
    steer = fitted(loaded, top_k=3, alpha=2.0, form=form)
    seen = {"before": [], "after": []}

    def recorder(which, layer):
        return lambda module, args: seen[which].append((layer, args[0].detach().clone()))

    with steer.applied(loaded):
        o_proj = [a.proj(i, "o_proj") for i in range(a.n_layers)]
        handles = [m.register_forward_pre_hook(recorder("before", i), prepend=True) for i, m in enumerate(o_proj)]
        handles += [m.register_forward_pre_hook(recorder("after", i)) for i, m in enumerate(o_proj)]
        try:
            with torch.no_grad():
                model.generate(**llava_inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
        finally:
            for h in handles:
                h.remove()
    assert len(seen["before"]) == len(seen["after"]) == 3 * a.n_layers  # prefill + 2 decode forwards
    chosen = set(steer.heads)
    for (layer, before), (_, after) in zip(seen["before"], seen["after"]):
        b4 = before.view(*before.shape[:2], a.n_heads, a.head_dim)  # [batch, pos, H, hd]
        aft = after.view_as(b4)
        changed = (aft != b4).any(-1)  # [batch, pos, H]
        for head in range(a.n_heads):
            if (layer, head) in chosen:
                assert changed[:, -1, head].all() and not changed[:, :-1, head].any()
                h, d = b4[:, -1, head].double(), steer.directions[layer, head]
                new = h - 2.0 * d if form == "add" else h - 2.0 * (h @ d)[:, None] * d
                new = new * h.norm(dim=-1, keepdim=True) / new.norm(dim=-1, keepdim=True)
                torch.testing.assert_close(aft[:, -1, head].double(), new, atol=1e-5, rtol=0)
            else:
                assert not changed[..., head].any()


def test_attach_changes_logits_and_detach_restores_them_bit_identically(loaded, llava_inputs):
    with torch.no_grad():
        base = loaded.model(**llava_inputs).logits
        steer = fitted(loaded, top_k=4, alpha=3.0)
        with steer.applied(loaded):
            steered = loaded.model(**llava_inputs).logits
        after = loaded.model(**llava_inputs).logits
    assert not torch.equal(base, steered)
    assert torch.equal(base, after)
    assert torch.equal(base[:, :-1], steered[:, :-1])  # positions="last": earlier positions untouched


def test_artifact_round_trip_and_model_check(loaded, tmp_path):
    steer = fitted(loaded, top_k=3, alpha=0.5, combine="svd", per_layer=True)
    path = steer.save(tmp_path / "sf")
    assert read_artifact(path).kind == "steerfair"
    back = load_intervention(path, loaded)
    assert isinstance(back, SteerFair) and back.config == steer.config and back.heads == steer.heads
    torch.testing.assert_close(back.directions, steer.directions, atol=1e-6, rtol=0)
    torch.testing.assert_close(back.importance, steer.importance, atol=1e-6, rtol=0)
    qwen = tiny_qwen2()
    other = Loaded(qwen, tiny_tokenizer(), Anatomy.of(qwen), name_or_path="tiny-qwen2")
    with pytest.raises(ValueError, match="n_kv_heads"):
        SteerFair.load(path, other)


def test_demonstrations_append_each_rules_option_after_the_prompt(loaded, mc_samples):
    demos = demonstrations(loaded, mc_samples[:2])
    assert len(demos) == 2 * 4 * 4  # questions x permutations x rules
    first = [d for d in demos if d.id.startswith("q0@p1#")]
    assert [d.rule for d in first] == [0, 1, 2, 3]
    choices = mc_samples[0].choices
    rotated = [choices[(i - 1) % 4] for i in range(4)]
    for d in first:
        letter = "ABCD"[d.rule]
        assert d.text.endswith(f"ASSISTANT: ({letter}) {rotated[d.rule]}")
        assert f"({letter}) {rotated[d.rule]}\n" in d.text  # the option shown at that position


@pytest.mark.slow
def test_steering_fit_callback_fits_on_the_activations_of_each_prompt(loaded, mc_samples, tmp_path):
    demos = demonstrations(loaded, mc_samples[:2])
    fit = SteeringFit(SteerFairConfig(top_k=2), tmp_path / "artifact", tmp_path / "plots")
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[fit])
    trainer.predict(DemonstrationModule(loaded, demos, batch_size=7), return_predictions=False)
    sites = [f"layers.{i}.attn.heads" for i in range(loaded.anatomy.n_layers)]
    for i, d in list(enumerate(demos))[::5]:  # one prompt per forward, no padding: an independent read
        inputs = encode(loaded, [d.text], [Image.open(d.image).convert("RGB")], "cpu")
        with torch.no_grad(), capture(loaded.model, sites, positions="last") as cap:
            loaded.model(**inputs)
        torch.testing.assert_close(fit.acts[i], torch.stack([cap[s][0, -1] for s in sites]), atol=1e-5, rtol=1e-4)
    rules = torch.tensor([d.rule for d in demos])
    assert torch.equal(fit.rules, rules)
    components, ratios = rule_pca(fit.acts, rules, 4)
    torch.testing.assert_close(fit.steerfair.rule_directions, components)
    torch.testing.assert_close(fit.steerfair.explained, ratios)
    assert fit.steerfair.info["per_rule"] == [len(demos) // 4] * 4
    assert (tmp_path / "artifact" / "artifact.json").is_file() and (tmp_path / "plots" / "kde_top_heads.png").is_file()
