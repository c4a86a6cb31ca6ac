"""Soft pruning for social bias: localize attention heads by Context Influence on BBQ, scale them down,
fine-tune to restore utility, and measure bias and utility before and after.

    influence.py  Context Influence per BBQ item (KL over the answer options; two variants)
    localize.py   per-head activations in one pass per item; Pearson r with Fisher-z intervals; heatmaps
    select.py     cross-category voting and the alpha schedule
    prune.py      SoftPruning: the o_proj gate or the Q/K/V row edit, as an Intervention and a `pruning` artifact
    finetune.py   utility-restoring fine-tuning with the pruning in place (FinetuneModule), resumable
    report.py     harness runs before / after pruning / after fine-tuning, one table and one CSV
    config.py     the recipe (configs/*/pruning.yaml)
    commands.py   `llava-circuits prune localize|apply|finetune|eval`
    stage.py      the demo's `pruning` stage
"""
from llava_circuits.pruning.influence import (
    InfluenceConfig,
    context_influence,
    kl_divergence,
)
from llava_circuits.pruning.localize import (
    Localization,
    LocalizeConfig,
    fisher_interval,
    localize,
    pearson,
)
from llava_circuits.pruning.prune import SoftPruning
from llava_circuits.pruning.select import SelectConfig, Selection, select_heads

__all__ = [
    "InfluenceConfig", "Localization", "LocalizeConfig", "SelectConfig", "Selection", "SoftPruning",
    "context_influence", "fisher_interval", "kl_divergence", "localize", "pearson", "select_heads",
]
