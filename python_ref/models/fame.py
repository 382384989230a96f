"""FAME in PyTorch (models/src/fame.rs; the choices made there are documented there)."""

import math

import torch

from . import layers


def _per_head(p, name, x):
    """`x: [H, R, in]` through per-head weights `[H, in, out]` and bias `[H, 1, out]`."""
    return x @ p[f"{name}.weight"] + p[f"{name}.bias"]


def _per_head_norm(p, name, x):
    return layers.layer_norm(x, p[f"{name}.gain"], p[f"{name}.bias"])


def query(p, inputs, rows, config, drop=layers.no_dropout):
    """The catalog scorer's inputs at `rows`: head states `[R, H, dh]`, gate
    logits `[R, H]`, per-head item tables `[H, V+1, dh]`, the mixing."""
    h, n = config["facets"], config["experts"]
    x, bias = layers.encode(p, inputs, config["blocks"] - 1, config["heads"], config["max_len"], drop)
    b, t, d = x.shape
    dh = d // h
    normed = layers.layer_norm(x, p["fame.attn_norm.gain"], p["fame.attn_norm.bias"])
    # Query expert e = h * N + n: weights [H * N, D, dh], bias [H * N, dh].
    q = torch.einsum("btd,edk->betk", normed, p["fame.query_experts.weight"])
    q = (q + p["fame.query_experts.bias"][None, :, None]).reshape(b, h, n, t, dh)
    k = layers.linear(p, "fame.key", normed).reshape(b, t, h, dh).transpose(1, 2)
    v = layers.linear(p, "fame.value", normed).reshape(b, t, h, dh).transpose(1, 2)
    # Expert n of head h attends over the head's keys and values.
    scores = torch.einsum("bhntd,bhsd->bhnts", q, k) / math.sqrt(dh) + bias[:, :, None]
    experts = torch.einsum("bhnts,bhsd->bhntd", drop(torch.softmax(scores, -1)), v)
    experts = experts.permute(1, 0, 3, 2, 4).reshape(h, b * t, n, dh)[:, rows]
    r = experts.shape[1]
    route = torch.softmax(_per_head(p, "fame.router", experts.reshape(h, r, n * dh)), -1)
    mixed = (route[..., None] * experts).sum(2)
    state = x.reshape(b * t, h, dh)[rows].transpose(0, 1) + drop(mixed)
    inner = drop(torch.relu(_per_head(p, "fame.ffn_inner", _per_head_norm(p, "fame.ffn_norm", state))))
    state = _per_head_norm(p, "fame.final_norm", state + drop(_per_head(p, "fame.ffn_outer", inner)))
    user = state.transpose(0, 1)
    gate_logits = layers.linear(p, "fame.gate", user.reshape(r, h * dh))
    items = torch.einsum("vd,hde->hve", p["items"], p["fame.item_facets"])
    return user, gate_logits, items, "probabilities" if config["mixing"] == 1 else "logits"


def loss(p, inputs, rows, targets, config, drop=layers.no_dropout):
    """Training loss of one batch."""
    return layers.query_loss(query(p, inputs, rows, config, drop), targets)
