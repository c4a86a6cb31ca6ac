"""features map: down_proj matching pursuit rebuilds decoder directions; co-activation lift."""
import copy

import torch

from llava_circuits.features.config import MapConfig
from llava_circuits.features.mapping import (
    coactivation_neurons,
    map_features,
    matching_pursuit,
)


def test_matching_pursuit_recovers_a_sparse_combination_of_columns():
    w = torch.randn(16, 40, generator=torch.Generator().manual_seed(0))
    target = 2.0 * w[:, 7] - 0.5 * w[:, 30] + 1.0 * w[:, 12]
    cols, weights, explained = matching_pursuit(w, target, 3)
    assert cols == [7, 12, 30] and torch.allclose(torch.tensor(weights), torch.tensor([2.0, 1.0, -0.5]), atol=1e-6)
    assert explained > 1 - 1e-9
    _, _, partial = matching_pursuit(w, torch.randn(16), 2)
    assert 0 < partial < 1


def test_features_map_to_the_neurons_whose_down_proj_columns_write_them(tiny, tiny_transcoders, tmp_path):
    tcs = copy.deepcopy(tiny_transcoders)  # the session's set stays as it is
    w_down = tiny.anatomy.proj(1, "down_proj").weight.detach()  # [d_model, d_mlp]
    with torch.no_grad():  # plant a feature whose decoder direction is made of three neurons' outputs
        tcs[1].W_dec[4] = (0.8 * w_down[:, 11] + 0.3 * w_down[:, 50] - 0.6 * w_down[:, 2]) / tcs[1].y_scale
    stats = {"coact_sum": torch.zeros(tcs.cfg.n_features, w_down.shape[1]), "feature_count": torch.zeros(tcs.cfg.n_features),
             "neuron_sum": torch.ones(w_down.shape[1]) * 10, "tokens": torch.tensor(100.0)}
    stats["coact_sum"][4, 9], stats["feature_count"][4] = 50.0, 10.0  # neuron 9: 5.0 when it fires vs 0.1 overall
    from safetensors.torch import save_file

    save_file(stats, str(tmp_path / "layer_1.safetensors"))
    [entry] = map_features(tiny, tcs, [{"layer": 1, "feature_idx": 4, "goodness_score": 2.0}],
                           MapConfig(top_k=3, coactivation=str(tmp_path)), amplification=2.0)
    assert [n["neuron_idx"] for n in entry["top_mlp_neurons"]] == [11, 2, 50]
    assert [round(n["weight"], 4) for n in entry["top_mlp_neurons"]] == [0.8, -0.6, 0.3]
    assert entry["explained"] > 0.999 and entry["amplification_factor"] == 2.0
    assert entry["coactivation_neurons"][0] == {"neuron_idx": 9, "weight": 4.9}
    assert coactivation_neurons(stats, 0, 3) == []  # never fired: no co-activation evidence
