"""Attribution graphs: direct linear edges between active features, error nodes, token and image-patch
embeddings and a target (a logit or a logit difference), in the frozen linearised model (`linear.py`).

Node order (circuit-tracer's): [selected features | error nodes (layer-major, L x T) | embeddings (T) |
target]. `Graph.adjacency` holds the rows of the nodes that have inputs: row i < n_selected is feature
`selected[i]` (its edges sum, with `rest` and `bias`, to its pre-activation minus b_enc) and the last row
is the target (its edges sum, with `rest` and `bias`, to the target logit). `rest` is what active
features left out by the cap write directly; the completeness check uses it.

Feature selection (the cap on feature nodes), as circuit-tracer: starting from the target's row,
features are visited in batches in order of their estimated influence on the target (the influence
of the rows computed so far, through |edges| normalised per row); the visited features are the graph's
feature nodes, and their rows are then computed exactly. When every active feature fits under the cap,
one pass does both.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import torch
from PIL import Image
from torch import Tensor

from llava_circuits.attribution.linear import LinearModel, Seed, raw_transcoders, record
from llava_circuits.models.load import Loaded
from llava_circuits.transcoders.transcoder import TranscoderSet

DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class AttributionConfig:
    """How an attribution graph is built and pruned."""

    max_feature_nodes: int = 7500
    """Cap on feature nodes: the most influential active features get rows and nodes (circuit-tracer's default)."""
    batch_size: int = 32
    """Rows (targets) computed per backward pass of the linearised model."""
    node_threshold: float = 0.8
    """Pruning keeps the nodes holding this fraction of the total influence on the target."""
    edge_threshold: float = 0.98
    """... and the edges holding this fraction of the total edge influence."""
    dtype: str = "float32"
    """Compute dtype of the linearised model (float32, or float64 for checks)."""
    chunk_elems: int = 2**27
    """Largest block of gathered decoder rows (+ their products) held at once, in elements (memory bound)."""


@dataclass
class Target:
    """What the graph explains: logit[token] (minus logit[contrast]) at position `pos`."""

    token: int
    contrast: int | None = None
    pos: int = -1
    label: str = ""
    """How the JSON names it, e.g. 'Yes' or 'Yes - No'."""


@dataclass
class Graph:
    """An attribution graph for one prompt; node order and rows as in the module docstring."""

    prompt: str
    input_ids: Tensor  # [T]
    tokens: list[str]  # per position; image patches as "<patch r,c>"
    image_positions: Tensor  # [P] positions of image tokens
    patch_coords: Tensor  # [P, 3] (image, row, col) of each image token
    grid: tuple[int, int] | None
    n_layers: int
    active: Tensor  # [n_active, 3] (layer, pos, feature) of every active feature
    activations: Tensor  # [n_active]
    selected: Tensor  # [S] indices into active: the feature nodes
    adjacency: Tensor  # [S + 1, S + L*T + T + 1] direct edges (rows: target nodes, columns: source nodes)
    rest: Tensor  # [S + 1] edges from active features that are not nodes, summed
    bias: Tensor  # [S + 1] biases' share of each row
    row_values: Tensor  # [S + 1] what each row sums to: pre-activation minus b_enc, then the target
    target: Target
    target_value: float  # the model's own target (logit or logit difference)
    target_prob: float  # softmax probability of target.token
    vocab_size: int
    config: dict = field(default_factory=dict)

    @property
    def n_selected(self) -> int:
        return len(self.selected)

    @property
    def n_pos(self) -> int:
        return len(self.input_ids)

    @property
    def n_nodes(self) -> int:
        return self.adjacency.shape[1]

    def error_index(self, layer: int, pos: int) -> int:
        return self.n_selected + layer * self.n_pos + pos

    def embed_index(self, pos: int) -> int:
        return self.n_selected + self.n_layers * self.n_pos + pos

    def completeness(self) -> Tensor:
        """[S + 1] relative error of sum(edges) + rest + bias against each row's value (last: the target)."""
        total = self.adjacency.double().sum(1) + self.rest.double() + self.bias.double()
        return (total - self.row_values.double()).abs() / self.row_values.double().abs().clamp_min(1e-12)

    def direct_patch_effects(self) -> Tensor:
        """[P] direct edges from each image patch to the target."""
        return self.adjacency[-1, [self.embed_index(int(p)) for p in self.image_positions]]


def token_id(tokenizer, text: str) -> int:
    """The id of `text` as the model would generate it (one token), e.g. 'Yes'."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise ValueError(f"target {text!r} is {len(ids)} tokens {pieces}; name a single token")
    if tokenizer.unk_token_id is not None and ids[0] == tokenizer.unk_token_id and text != tokenizer.unk_token:
        raise ValueError(f"target {text!r} is not in the vocabulary (it tokenizes to {tokenizer.unk_token!r})")
    return ids[0]


def prepare_inputs(loaded: Loaded, image: Image.Image | None, prompt: str) -> dict:
    """Processor inputs (batch of one) on the model's device, pixel values in its dtype."""
    param = next(loaded.model.parameters())
    if image is None:
        inputs = loaded.tokenizer([prompt], return_tensors="pt")
    else:
        inputs = loaded.processor(images=[image.convert("RGB")], text=[prompt], return_tensors="pt")
    inputs = {k: v.to(param.device) for k, v in dict(inputs).items()}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(param.dtype)
    return inputs


def attribute_graph(loaded: Loaded, transcoders: TranscoderSet, inputs: dict, target: Target | None = None,
                    config: AttributionConfig | None = None, prompt: str = "") -> Graph:
    """Record the prompt, linearise, select the feature nodes and compute their direct edges and the target's."""
    cfg = config or AttributionConfig()
    rec = record(loaded, inputs)
    lin = LinearModel(loaded, rec, raw_transcoders(transcoders), DTYPES[cfg.dtype], cfg.chunk_elems)
    T = lin.T
    pos = target.pos % T if target is not None else T - 1
    if target is None:
        token = int(rec.logits[pos].argmax())
        target = Target(token, None, pos, loaded.tokenizer.decode([token]))
    target = replace(target, pos=pos)  # the caller's target stays as given (pos -1 fits any prompt)
    seed = target_seed(loaded, lin, target)
    logits = rec.logits[pos].double()
    value = float(logits[target.token] - (logits[target.contrast] if target.contrast is not None else 0.0))
    if len(lin.active) <= cfg.max_feature_nodes:
        selected = torch.arange(len(lin.active), device=lin.device)
    else:
        selected = select_features(lin, seed, cfg)
    adjacency, rest, bias = compute_rows(lin, seed, selected, cfg.batch_size)
    pres = [lin.feature_pre(*lin.active[i].tolist()) for i in selected.tolist()]
    return Graph(
        prompt=prompt, input_ids=rec.input_ids.cpu(), tokens=display_tokens(loaded, rec.input_ids),
        image_positions=image_positions(loaded, rec.input_ids), patch_coords=patch_coords(loaded, rec.input_ids),
        grid=loaded.anatomy.image_grid, n_layers=loaded.anatomy.n_layers,
        active=lin.active.cpu(), activations=lin.values.float().cpu(), selected=selected.cpu(),
        adjacency=adjacency, rest=rest, bias=bias, row_values=torch.tensor(pres + [value], dtype=torch.float64),
        target=target, target_value=value, target_prob=float(torch.softmax(logits, -1)[target.token]),
        vocab_size=rec.logits.shape[-1], config=asdict(cfg),
    )


def target_seed(loaded: Loaded, lin: LinearModel, target: Target) -> Seed:
    """The seed of the target logit (difference): the unembedding direction and bias through the final norm."""
    head = loaded.anatomy.lm_head
    direction = head.weight[target.token].detach().double()
    bias = float(head.bias[target.token]) if head.bias is not None else 0.0
    if target.contrast is not None:
        direction = direction - head.weight[target.contrast].detach().double()
        bias -= float(head.bias[target.contrast]) if head.bias is not None else 0.0
    return lin.logit_seed(direction, target.pos, bias)


def row_l1(lin: LinearModel, rows) -> Tensor:
    """[B] L1 norm of each row over every source node (features, errors, embeddings)."""
    return rows.features.abs().sum(1) + rows.errors.abs().sum((1, 2)) + rows.embeds.abs().sum(1)


def select_features(lin: LinearModel, seed: Seed, cfg: AttributionConfig) -> Tensor:
    """Indices into lin.active of the `max_feature_nodes` features visited in order of estimated influence."""
    first = lin.backward([seed])
    score = first.features[0].abs() / row_l1(lin, first).clamp_min(1e-30)  # influence estimate per active feature
    visited = torch.zeros(len(lin.active), dtype=torch.bool, device=lin.device)
    order = []
    while len(order) < cfg.max_feature_nodes:
        n = min(cfg.batch_size, cfg.max_feature_nodes - len(order))
        top = score.masked_fill(visited, -1.0).topk(min(n, int((~visited).sum()))).indices
        top = top[score[top] > 0]
        if len(top) == 0:
            break
        rows = lin.backward([lin.feature_seed(*lin.active[i].tolist()) for i in top.tolist()])
        weight = score[top] / row_l1(lin, rows).clamp_min(1e-30)  # [B]
        visited[top] = True
        score = score + weight @ rows.features.abs()
        order += top.tolist()
    return torch.tensor(sorted(order), dtype=torch.long, device=lin.device)


def compute_rows(lin: LinearModel, seed: Seed, selected: Tensor, batch_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """(adjacency [S + 1, N], rest [S + 1], bias [S + 1]) on the CPU in float32 (float64 if computing in it)."""
    S, L, T = len(selected), lin.a.n_layers, lin.T
    out_dtype = torch.float64 if lin.dtype == torch.float64 else torch.float32
    adjacency = torch.zeros(S + 1, S + L * T + T + 1, dtype=out_dtype)
    rest = torch.zeros(S + 1, dtype=out_dtype)
    bias = torch.zeros(S + 1, dtype=out_dtype)
    targets = [(i, lin.feature_seed(*lin.active[int(f)].tolist())) for i, f in enumerate(selected.tolist())]
    targets.append((S, seed))
    for start in range(0, len(targets), batch_size):
        chunk = targets[start : start + batch_size]
        rows = lin.backward([s for _, s in chunk])
        index = [i for i, _ in chunk]
        picked = rows.features[:, selected]
        adjacency[index, :S] = picked.to("cpu", out_dtype)
        adjacency[index, S : S + L * T] = rows.errors.reshape(len(chunk), -1).to("cpu", out_dtype)
        adjacency[index, S + L * T : S + L * T + T] = rows.embeds.to("cpu", out_dtype)
        rest[index] = (rows.features.sum(1) - picked.sum(1)).to("cpu", out_dtype)
        bias[index] = rows.bias.to("cpu", out_dtype)
    return adjacency, rest, bias


def image_positions(loaded: Loaded, input_ids: Tensor) -> Tensor:
    return loaded.anatomy.image_mask(input_ids[None])[0].nonzero().flatten().cpu()


def patch_coords(loaded: Loaded, input_ids: Tensor) -> Tensor:
    """[P, 3] (image, row, col) of each image token: the vision tower emits each image's patches row-major."""
    a = loaded.anatomy
    n = len(image_positions(loaded, input_ids))
    if n == 0:
        return torch.zeros(0, 3, dtype=torch.long)
    i = torch.arange(n)
    image, within = i // a.n_image_tokens, i % a.n_image_tokens
    return torch.stack([image, within // a.image_grid[1], within % a.image_grid[1]], 1)


def display_tokens(loaded: Loaded, input_ids: Tensor) -> list[str]:
    """Each position's token as text; image tokens as '<patch row,col>'."""
    tokens = loaded.tokenizer.convert_ids_to_tokens(input_ids.tolist())
    for p, (_, r, c) in zip(image_positions(loaded, input_ids).tolist(), patch_coords(loaded, input_ids).tolist()):
        tokens[p] = f"<patch {r},{c}>"
    return tokens
