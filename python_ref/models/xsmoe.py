"""XSMoE in PyTorch (models/src/xsmoe.rs; the choices are documented there).

`p` holds the trainable parameters by their Rust names; `config["consts"]`
the frozen parts: `backbone{l}` (the content encoder's states over the
window's catalog), `side{l}.frozen_down` / `side{l}.frozen_up` (frozen
experts, when there are any), `side{l}.active` (1 = not pruned) and
`item_bias` (`-log p(item)`).
"""

import torch
import torch.nn.functional as F

from . import layers


def item_table(p, consts, num_layers):
    """`[V+1, D]` item vectors: the side network over the frozen states, projected."""
    states = [consts[f"backbone{l}"] for l in range(num_layers + 1)]
    x = states[0]
    if "side0.router" not in p:
        return layers.linear(p, "item_proj", states[num_layers])
    for l in range(num_layers):
        active = consts[f"side{l}.active"].to(torch.bool)
        frozen = [consts[f"side{l}.frozen_down"]] if f"side{l}.frozen_down" in consts else []
        down = torch.cat(frozen + [p[f"side{l}.down"]])[active]
        frozen = [consts[f"side{l}.frozen_up"]] if f"side{l}.frozen_up" in consts else []
        up = torch.cat(frozen + [p[f"side{l}.up"]])[active]
        # Candidate 0 is the backbone's state; pruned experts take no weight.
        candidates = torch.cat([torch.ones(1, dtype=torch.bool), active])
        w = torch.softmax((x @ p[f"side{l}.router"])[:, candidates], -1)
        experts = x[None] + torch.einsum("enb,ebd->end", F.gelu(torch.einsum("nd,edb->enb", x, down)), up)
        x = w[:, :1] * states[l + 1] + torch.einsum("ne,end->nd", w[:, 1:], experts)
    return layers.linear(p, "item_proj", x)


def query(p, inputs, rows, config, drop=layers.no_dropout):
    """User states `[R, 1, D]` at `rows`, no gate, the item table, Logits mixing."""
    items = item_table(p, config["consts"], config["layers"])
    x, _ = layers.encode(p, inputs, config["blocks"], config["heads"], config["max_len"], drop, table=items)
    x = layers.layer_norm(x, p["final_norm.gain"], p["final_norm.bias"])
    return x.reshape(-1, x.shape[-1])[rows][:, None], None, items, "logits"


def loss(p, inputs, rows, targets, config, drop=layers.no_dropout):
    """Cross-entropy over the catalog with `item_bias` added to the logits, the
    padding item and the row's own sequence (but its target) left out."""
    user, _, items, _ = query(p, inputs, rows, config, drop)
    logits = user[:, 0] @ items.T + config["consts"]["item_bias"]
    width = inputs.shape[1]
    excluded = torch.zeros_like(logits, dtype=torch.bool)
    excluded[:, 0] = True
    for r, (row, target) in enumerate(zip(rows.tolist(), targets.tolist())):
        b = row // width
        seen = set(inputs[b].tolist()) | set(targets[rows // width == b].tolist())
        excluded[r, [i for i in seen if i not in (0, target)]] = True
    logits = logits.masked_fill(excluded, float("-inf"))
    return (torch.logsumexp(logits, -1) - logits.gather(1, targets[:, None])[:, 0]).mean()
