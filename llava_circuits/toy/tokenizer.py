"""The toy tokenizer: a word-level `tokenizers` model wrapped as a PreTrainedTokenizerFast.

Words are split on whitespace and every punctuation mark is its own token, so "(A) red" is
["(", "A", ")", "red"] and newlines vs spaces make no difference. Case is kept ("Yes" vs "yes").
Special tokens follow Llama/LLaVA: <unk>=0, <s>=1 (prepended to every encoding), </s>=2, plus
<pad>=3 and <image>=4. The vocabulary is every word the toy tasks can produce, plus a few words
that common prompt templates add ("Context", "Options", ...).
"""
from __future__ import annotations

import random
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from llava_circuits.toy import scenes, tasks

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")
EXTRA_WORDS = "USER ASSISTANT Yes No yes no Context Options Question Answer answer image picture . , : ; ? ! ' \" ( ) -"


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")])


def corpus() -> list[str]:
    """Text covering every word the toy tasks can produce (template lists plus sampled items)."""
    texts = [EXTRA_WORDS, tasks.INSTRUCTION, tasks.SHORT_ANSWER, tasks.CAPTION_QUERY, " ".join(tasks.LETTERS)]
    texts += [" ".join(x) for x in (scenes.OBJECTS, scenes.COLOURS, scenes.QUADRANTS, tasks.NUMBERS, tasks.OPPOSITES)]
    texts += [" ".join(x) for x in (tasks.GROUPS, tasks.NOUNS, tasks.UNKNOWNS)]
    texts += [" ".join(s) for s in tasks.SCENARIOS]
    rng = random.Random("vocabulary")
    for _ in range(2000):
        scene = scenes.sample_scene(rng)
        texts.append(tasks.caption(scene))
        texts.append(tasks.pope_question(rng.choice(scenes.OBJECTS)))
        texts.append(tasks.settled_item(rng, scene).text())
        texts.append(tasks.unsettled_item(rng, scene).text("dot"))
        texts.append(tasks.utility_item(rng).text())
        texts.append(tasks.bbq_text(tasks.random_bbq_item(rng)))
    return texts


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Build the toy tokenizer from the task vocabulary (deterministic: same ids every time)."""
    pre = _pre_tokenizer()
    words = sorted({w for text in corpus() for w, _ in pre.pre_tokenize_str(text)})
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
        model_max_length=256,
        clean_up_tokenization_spaces=False,
    )


def save_tokenizer(out: str | Path) -> PreTrainedTokenizerFast:
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(out)
    return tokenizer
