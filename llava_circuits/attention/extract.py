"""Record, while the model generates, the attention of each step's query to the image tokens.

Steps: step 0 is the forward over the prompt, whose last token's attention produces the first answer
token; step t > 0 is the decode forward of generated token t-1, which produces generated token t.
Only the layers asked for run eager attention (`sites.capture` switches just those), and only the
step rows and the image columns of their probabilities are kept.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import Tensor

from llava_circuits.evaluation.module import format_prompt
from llava_circuits.sites import capture

Selection = str | int | Sequence[int] | range | None

_RANGE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")


def parse_indices(spec: Selection, n: int | None = None, name: str = "index") -> list[int] | None:
    """Indices from "all" (None: every one), an int, a list/range, "3", "0,2,5" or inclusive "0-4" (mixable)."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "all"):
        return None if n is None else list(range(n))
    if isinstance(spec, int):
        values = [spec]
    elif isinstance(spec, str):
        values = []
        for part in filter(None, (p.strip() for p in spec.split(","))):
            match = _RANGE.match(part)
            if match:
                values += list(range(int(match.group(1)), int(match.group(2)) + 1))
            elif part.isdigit():
                values.append(int(part))
            else:
                raise ValueError(f"{name}: cannot read {part!r} in {spec!r}; use all, 3, 0,2,5 or 0-4")
    else:
        values = [int(v) for v in spec]
    if n is not None and any(not 0 <= v < n for v in values):
        raise ValueError(f"{name}: {values} out of range, there are {n}")
    return sorted(dict.fromkeys(values))


@dataclass
class AttentionRecord:
    """Attention of each kept generation step to the image tokens, on chosen layers and heads."""

    probs: Tensor  # [steps, layers, heads, n_image_tokens] float32
    steps: list[int]
    """Generation step of each row of probs."""
    layers: list[int]
    heads: list[int]
    grid: tuple[int, int]
    """(rows, cols) of the image tokens, row-major."""
    positions: list[int]
    """Absolute position of each step's query token."""
    query_tokens: list[str]
    """The token whose attention each step holds (the prompt's last token at step 0)."""
    tokens: list[str]
    """The token each step produced."""
    prompt: str
    generated_text: str

    def meta(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "probs"} | {"grid": list(self.grid)}

    def step_table(self) -> list[dict]:
        """The step-to-token mapping."""
        return [{"step": s, "position": p, "query_token": q, "token": t}
                for s, p, q, t in zip(self.steps, self.positions, self.query_tokens, self.tokens)]

    def save(self, folder: str | Path) -> Path:
        """attention.safetensors (probs) and attention.json (the rest), each written atomically."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / ".attention.safetensors.tmp"
        save_file({"probs": self.probs.contiguous()}, str(tmp))
        tmp.replace(folder / "attention.safetensors")
        tmp = folder / ".attention.json.tmp"
        tmp.write_text(json.dumps(self.meta(), indent=1, ensure_ascii=False))
        tmp.replace(folder / "attention.json")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "AttentionRecord":
        folder = Path(folder)
        meta = json.loads((folder / "attention.json").read_text())
        meta["grid"] = tuple(meta["grid"])
        return cls(probs=load_file(str(folder / "attention.safetensors"))["probs"], **meta)


def encode(loaded, image: Image.Image, prompt: str) -> dict:
    """Processor inputs for one image and prompt; a prompt without "<image>" is wrapped in the model's template."""
    text = prompt if "<image>" in prompt else format_prompt(loaded, prompt, True)
    inputs = loaded.processor(images=[image.convert("RGB")], text=[text], return_tensors="pt")
    device = next(loaded.model.parameters()).device
    return {k: v.to(device) for k, v in inputs.items()}


@torch.no_grad()
def extract_attention(loaded, image: Image.Image, prompt: str, layers: Selection = "all", heads: Selection = "all",
                      steps: Selection = "all", max_new_tokens: int = 16) -> AttentionRecord:
    """Generate greedily and record the attention of the chosen steps to the image tokens."""
    a = loaded.anatomy
    if a.image_grid is None:
        raise ValueError(f"{loaded.name_or_path}: a text-only model has no image tokens to attend to")
    layer_ids, head_ids = parse_indices(layers, a.n_layers, "layers"), parse_indices(heads, a.n_heads, "heads")
    step_ids = parse_indices(steps, None, "steps")
    inputs = encode(loaded, image, prompt)
    length = inputs["input_ids"].shape[1]
    positions = "last" if step_ids is None else [length - 1 + s for s in step_ids]
    sites = [f"layers.{i}.attn.probs" for i in layer_ids]
    tokenizer = loaded.tokenizer
    with capture(loaded.model, sites, positions=positions, anatomy=a, key_positions="image") as cap:
        out = loaded.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id)
    generated = out[0, length:].tolist()
    if sites[0] not in cap:  # every asked step lies past the end of generation
        kept, probs = [], torch.zeros(0, len(layer_ids), len(head_ids), a.n_image_tokens)
    else:
        kept = (cap.positions(sites[0])[0] - (length - 1)).tolist()
        probs = torch.stack([cap[s][0] for s in sites], dim=1)  # [steps, layers, n_heads, n_image]
        probs = probs[:, :, head_ids].float().cpu()
    queries = [inputs["input_ids"][0, -1].item()] + generated
    return AttentionRecord(
        probs=probs, steps=kept, layers=layer_ids, heads=head_ids, grid=tuple(a.image_grid),
        positions=[length - 1 + s for s in kept],
        query_tokens=tokenizer.convert_ids_to_tokens([queries[s] for s in kept]),
        tokens=tokenizer.convert_ids_to_tokens([generated[s] for s in kept]),
        prompt=prompt, generated_text=tokenizer.decode(generated, skip_special_tokens=True).strip(),
    )


def word_query(tokenizer, words: Sequence[str]):
    """A `positions` selector for a prefill: in row b, the last prompt token that spells the end of words[b]
    (a multi-token word is read at its last token, where the whole word is in view)."""
    ids = [tokenizer.encode(w, add_special_tokens=False)[-1] for w in words]

    def select(step) -> Tensor:
        hits = step.input_ids == torch.tensor(ids, device=step.input_ids.device)[:, None]  # [batch, pos]
        missing = [words[b] for b in range(len(words)) if not hits[b].any()]
        if missing:
            raise ValueError(f"query word(s) {missing} do not occur in their prompts")
        last = hits.shape[1] - 1 - hits.flip(1).int().argmax(1)  # column of the last hit per row
        return torch.nn.functional.one_hot(last, hits.shape[1]).bool()

    return select


@torch.no_grad()
def prompt_attention(loaded, items: Sequence[tuple[Image.Image, str]], layers: Selection = "all",
                     batch_size: int = 8, words: Sequence[str] | None = None) -> Tensor:
    """Attention of one query per prompt to its image tokens, one forward per batch: [n, layers, heads, n_image].

    The query is the prompt's last token (what produces the first answer token), or with `words` the last token
    of each prompt's word (e.g. the asked object's name, where a small model looks the object up)."""
    a = loaded.anatomy
    layer_ids = parse_indices(layers, a.n_layers, "layers")
    sites = [f"layers.{i}.attn.probs" for i in layer_ids]
    device = next(loaded.model.parameters()).device
    parts = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        texts = [p if "<image>" in p else format_prompt(loaded, p, True) for _, p in chunk]
        inputs = loaded.processor(images=[im.convert("RGB") for im, _ in chunk], text=texts,
                                  return_tensors="pt", padding=True)
        inputs = {k: v.to(device) for k, v in inputs.items()}
        positions = "prompt_last" if words is None else word_query(loaded.tokenizer, words[start : start + batch_size])
        with capture(loaded.model, sites, positions=positions, anatomy=a, key_positions="image") as cap:
            loaded.model(**inputs)
        parts.append(torch.stack([cap[s][:, 0] for s in sites], dim=1).float().cpu())  # [batch, layers, heads, n]
    return torch.cat(parts)
