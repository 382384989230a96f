"""The layers of models/src/nn.rs and the scorer of models/src/scoring.rs in PyTorch.

Parameters live in a dict `p` keyed by the Rust names; every function reads
what it needs from it.
"""

import math

import torch

LAYER_NORM_EPS = 1e-8


def no_dropout(x):
    """The identity: evaluation and the parity tests."""
    return x


def linear(p, name, x):
    """`x W + b` with `W: [in, out]`."""
    return x @ p[f"{name}.weight"] + p[f"{name}.bias"]


def layer_norm(x, gain, bias):
    """Layer norm over the last dimension (biased variance, eps 1e-8)."""
    centred = x - x.mean(-1, keepdim=True)
    var = centred.pow(2).mean(-1, keepdim=True)
    return centred / torch.sqrt(var + LAYER_NORM_EPS) * gain + bias


def attention_bias(inputs):
    """`[B, 1, T, T]`: 0 where query t may see key s (s <= t and s is an item,
    or s == t), -inf elsewhere (models/src/batch.rs)."""
    b, t = inputs.shape
    causal = torch.tril(torch.ones(t, t, dtype=torch.bool))
    allowed = causal & (inputs != 0)[:, None, :]
    allowed = allowed | torch.eye(t, dtype=torch.bool)
    bias = torch.zeros(b, t, t)
    bias[~allowed] = float("-inf")
    return bias[:, None]


def positions(width, max_len):
    """Positional rows counted back from the newest item."""
    return torch.arange(max_len - width, max_len)


def block(p, name, x, bias, heads, drop=no_dropout):
    """Pre-norm causal self-attention block (models/src/nn.rs `AttentionBlock`);
    `drop` is applied where the Rust block applies dropout."""
    b, t, d = x.shape
    h = layer_norm(x, p[f"{name}.attn_norm.gain"], p[f"{name}.attn_norm.bias"])

    def split(y):
        return y.reshape(b, t, heads, d // heads).transpose(1, 2)

    q, k, v = (split(linear(p, f"{name}.{w}", h)) for w in ("query", "key", "value"))
    scores = q @ k.transpose(2, 3) / math.sqrt(d // heads) + bias
    attended = (drop(torch.softmax(scores, -1)) @ v).transpose(1, 2).reshape(b, t, d)
    x = x + drop(linear(p, f"{name}.output", attended))
    f = layer_norm(x, p[f"{name}.ffn_norm.gain"], p[f"{name}.ffn_norm.bias"])
    f = linear(p, f"{name}.ffn.outer", drop(torch.relu(linear(p, f"{name}.ffn.inner", f))))
    return x + drop(f)


def encode(p, inputs, blocks, heads, max_len, drop=no_dropout, table=None):
    """Embeddings and the SASRec blocks: `[B, T, D]`. The items are looked up
    in `table` (`[V+1, D]`; XSMoE's item vectors), by default `p["items"]`."""
    table = p["items"] if table is None else table
    d = table.shape[1]
    x = drop(table[inputs] * math.sqrt(d) + p["positions"][positions(inputs.shape[1], max_len)])
    bias = attention_bias(inputs)
    for i in range(blocks):
        x = block(p, f"block{i}", x, bias, heads, drop)
    return x, bias


def scores(user, items):
    """`[R, H, V]` per-head scores over the catalog 1..V."""
    if items.dim() == 2:
        return torch.einsum("rhd,vd->rhv", user, items[1:])
    return torch.einsum("rhd,hvd->rhv", user, items[:, 1:])


def ranking_scores(user, gate_logits, items, mixing):
    """`[R, V]` what the ranking orders items 1..V by (models/src/scoring.rs
    `top_n`, DESIGN 4.4 `scores`): the mixed logits S, or with Probabilities
    mixing the mixed probabilities P."""
    s = scores(user, items)
    if gate_logits is None:
        return s[:, 0]
    g = torch.softmax(gate_logits, -1)[:, :, None]
    if mixing == "logits":
        return (g * s).sum(1)
    return (g * torch.softmax(s, -1)).sum(1)


def cross_entropy(user, gate_logits, items, targets, mixing):
    """Mean `-log P[target]` over the catalog 1..V (row 0 is padding, excluded).

    user `[R, H, D]`; gate_logits `[R, H]` or None (H = 1); items `[V+1, D]`
    shared or `[H, V+1, D]` per head; mixing "logits" or "probabilities".
    """
    s = scores(user, items)
    column = (targets - 1)[:, None]
    if gate_logits is None:
        return -torch.log_softmax(s[:, 0], -1).gather(1, column).mean()
    if mixing == "logits":
        mixed = (torch.softmax(gate_logits, -1)[:, :, None] * s).sum(1)
        return -torch.log_softmax(mixed, -1).gather(1, column).mean()
    terms = torch.log_softmax(s, -1) + torch.log_softmax(gate_logits, -1)[:, :, None]
    return -torch.logsumexp(terms, 1).gather(1, column).mean()


def query_loss(query, targets):
    """`cross_entropy` of a model's `(user, gate_logits, items, mixing)` query."""
    user, gate_logits, items, mixing = query
    return cross_entropy(user, gate_logits, items, targets, mixing)
