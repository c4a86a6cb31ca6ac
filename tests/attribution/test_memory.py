"""The memory estimate: its terms add up, LLaVA-1.5-7B with a 600-token prompt fits one 80 GB GPU."""
import pytest

from llava_circuits.attribution.memory import estimate_memory


def test_llava_7b_with_600_tokens_fits_one_80gb_gpu():
    est = estimate_memory()
    parts = {k: v for k, v in est.items() if k not in ("total", "adjacency_host")}
    assert est["total"] == pytest.approx(sum(parts.values()))
    assert est["model_weights"] == pytest.approx(7.06e9 * 2 / 2**30)
    assert est["transcoders"] == pytest.approx(32 * 2 * 32768 * 4096 * 4 / 2**30, rel=1e-3)
    assert est["total"] < 0.8 * 80 * 1e9 / 2**30  # with room for the allocator


def test_smaller_batches_and_chunks_lower_the_working_memory():
    big, small = estimate_memory(batch_size=32), estimate_memory(batch_size=8, chunk_elems=2**24)
    assert small["backward_buffers"] < big["backward_buffers"] / 3
    assert small["model_weights"] == big["model_weights"]
