import torch

from llava_circuits.attention.bench import PeakTensorBytes, memory_ratio


def test_peak_tensor_bytes_counts_new_storages_while_they_live():
    weight = torch.ones(1000)
    with PeakTensorBytes() as tracker:
        a = torch.empty(1000)  # 4000 bytes
        b = a.view(10, 100)  # a view: no new storage
        c = weight[:10]  # a view of a tensor made before the block: not counted
        del a, b
        d = torch.empty(500)  # 2000 bytes; a's 4000 were freed
        e = weight * 2  # 4000 bytes
        weight.add_(1)  # in place on a tensor made before the block: nothing new
        e.mul_(3)
    assert tracker.peak == 6000 and tracker.current == 6000
    del c, d, e


def test_memory_ratio_of_two_layers_against_all(tiny):
    result = memory_ratio(tiny, batch=2, text_len=40)
    peaks = result["peak_bytes"]
    batch, length = result["batch"]
    kept = 3 * batch * 4 * length * length * 4  # output_attentions keeps [batch, heads, T, T] float32 per layer
    assert peaks["full"] >= kept and 0 < peaks["extract"] < peaks["full"]
    assert result["ratios"]["memory_ratio"] == peaks["extract"] / peaks["full"]
    assert result["layers"] == [2, 3] and 0 < result["memory_ratio_with_kv_cache"] < 1
    assert tiny.model.config._attn_implementation == "sdpa"  # put back after the eager run


def test_geometry_model_has_llava15_7b_attention_shape():
    from llava_circuits.attention.bench import geometry_model

    loaded = geometry_model(width=64)
    a = loaded.anatomy
    assert (a.n_layers, a.n_heads, a.n_image_tokens, a.image_grid) == (32, 32, 576, (24, 24))
    assert loaded.model.config.text_config.intermediate_size == 64 * 11008 // 4096
