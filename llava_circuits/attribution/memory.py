"""Device memory of one `attribute` run, term by term (GiB), to size a prompt and batch before loading anything.

Defaults: LLaVA-1.5-7B (bf16) with per-layer transcoders of 32768 features (fp32, as artifacts store them),
a ~600-token prompt (576 image tokens), ReLU features with ~200 active per token and layer, circuit-tracer's
cap of 7500 feature nodes, rows computed 32 at a time in fp32. docs/attribution.md prints the table.
"""
from __future__ import annotations

GIB = 2**30


def estimate_memory(n_tokens: int = 600, n_layers: int = 32, d_model: int = 4096, n_heads: int = 32,
                    vocab: int = 32064, model_params: float = 7.06e9, model_bytes: int = 2, d_tc: int = 32768,
                    transcoder_bytes: int = 4, active_per_token: int = 200, batch_size: int = 32,
                    chunk_elems: int = 2**27, max_feature_nodes: int = 7500) -> dict[str, float]:
    """GiB per term on the device, plus `total` and the graph's host-memory `adjacency_host`."""
    T, L, d, B = n_tokens, n_layers, d_model, batch_size
    n_active = T * L * active_per_token
    terms = {
        "model_weights": model_params * model_bytes,
        "transcoders": L * (2 * d_tc * d_model + d_tc + d_model) * transcoder_bytes,
        # record: resid_pre, attn.out, mlp.in, mlp.out [T, d] and probs [T, H, T] per layer, logits [T, V] fp32
        "recorded_activations": L * (4 * T * d + n_heads * T * T) * model_bytes + T * vocab * 4,
        # linear model: fp32 copies of MLP inputs and error terms, dense feature activations [T, d_tc] per layer
        "linear_model": L * (2 * T * d + T * d_tc) * 4 + n_active * (3 * 8 + 4),
        # one backward: G, d/dz, d/dv, d/dh [B, T, d]; the rows [B, n_active]; one gathered decoder block
        "backward_buffers": 4 * B * T * d * 4 + B * n_active * 4 + chunk_elems * 4,
        # the forward of the recording runs eager attention: scores and probabilities of one layer
        "forward_peak": 2 * n_heads * T * T * 4,
    }
    out = {k: v / GIB for k, v in terms.items()}
    out["total"] = sum(out.values())
    n_nodes = max_feature_nodes + L * T + T + 1
    out["adjacency_host"] = (max_feature_nodes + 1) * n_nodes * 4 / GIB
    return out
