"""The toy model: a LlavaForConditionalGeneration with a small CLIP vision tower and a small Llama.

Same architecture and code path as llava-hf/llava-1.5-7b-hf, shrunk: CLIP patch features (CLS
dropped by the "default" strategy) from `vision_feature_layer`, a 2-layer GELU projector into the
Llama embedding space, and the 16 image tokens in place of "<image>" in the prompt. LLaVA-1.5 reads
the penultimate layer of a 24-layer CLIP; the toy CLIP has 2 layers and is read at its last (-1),
so no layer sits unused.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from transformers import (
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerBase,
)

from llava_circuits.toy.scenes import CELL, IMAGE_SIZE


@dataclass
class ToyModelConfig:
    """Sizes of the toy LLaVA."""

    vision_width: int = 128
    """CLIP hidden size."""
    vision_layers: int = 2
    """CLIP layers."""
    vision_heads: int = 4
    """CLIP attention heads."""
    vision_mlp: int = 512
    """CLIP MLP width."""
    vision_feature_layer: int = -1
    """CLIP hidden state the projector reads (LLaVA-1.5: -2 of 24 layers)."""
    text_width: int = 128
    """Llama hidden size (d_model)."""
    text_layers: int = 4
    """Llama decoder layers."""
    text_heads: int = 4
    """Llama attention heads."""
    text_kv_heads: int = 4
    """Llama key/value heads (= text_heads: multi-head attention, as in LLaVA-1.5's Llama-2)."""
    text_mlp: int = 512
    """Llama MLP width (d_mlp)."""
    max_positions: int = 256
    """Llama max_position_embeddings."""
    init_std: float = 0.088
    """Llama initializer_range, ~ text_width**-0.5: at width 128 the usual 0.02 leaves attention flat for long."""


def build_model(tokenizer: PreTrainedTokenizerBase, cfg: ToyModelConfig | None = None, seed: int = 0) -> LlavaForConditionalGeneration:
    """A freshly initialised toy LLaVA whose vocabulary matches `tokenizer`."""
    import torch

    cfg = cfg or ToyModelConfig()
    vision = CLIPVisionConfig(
        hidden_size=cfg.vision_width,
        intermediate_size=cfg.vision_mlp,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads,
        image_size=IMAGE_SIZE,
        patch_size=CELL,
        projection_dim=cfg.vision_width,
        hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.text_width,
        intermediate_size=cfg.text_mlp,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        num_key_value_heads=cfg.text_kv_heads,
        max_position_embeddings=cfg.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        initializer_range=cfg.init_std,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(IMAGE_SIZE // CELL) ** 2,
        vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    # The projector's default init (std 0.02) shrinks the image features ~40x below the token
    # embeddings, and a from-scratch model then never learns to read them: keep their scale.
    for linear in (model.model.multi_modal_projector.linear_1, model.model.multi_modal_projector.linear_2):
        torch.nn.init.normal_(linear.weight, std=linear.in_features**-0.5)
        torch.nn.init.zeros_(linear.bias)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=32,
    )
    return model


def config_dict(cfg: ToyModelConfig) -> dict:
    return asdict(cfg)
