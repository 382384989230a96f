"""FuXi-alpha and Fuxi-MME in PyTorch (models/src/fuxi.rs; the choices made there are documented there).

The routed experts are computed densely here: every expert runs on every
token and a token's output weights them by its renormalised top-k routing
weights (zero for the experts it did not select), which is the same function
as moerec's grouped dispatch.
"""

import math

import torch

from . import layers

RMS_NORM_EPS = 1e-6
L2_EPS = 1e-12
CHANNELS = 2


def rms_norm(x):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + RMS_NORM_EPS)


def l2_normalize(x):
    return x / torch.sqrt(x.pow(2).sum(-1, keepdim=True) + L2_EPS)


def swiglu(h):
    f = h.shape[-1] // 2
    return torch.nn.functional.silu(h[..., :f]) * h[..., f:]


def moe(p, name, x, valid, k):
    """Top-k routed SwiGLU experts on `x: [N, D]` (tokens with `valid` False get nothing);
    returns the experts' mixed output and the load-balance loss E * sum_e f_e P_e."""
    probs = torch.softmax(x @ p[f"{name}.router"], -1)
    experts = probs.shape[1]
    top = torch.topk(probs, k, dim=-1).indices
    chosen = torch.zeros_like(probs, dtype=torch.bool).scatter(1, top, True) & valid[:, None]
    weights = torch.where(chosen, probs, torch.zeros_like(probs))
    weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-300)
    hidden = swiglu(torch.einsum("nd,edf->enf", x, p[f"{name}.up"]))
    out = torch.einsum("enf,efd->end", hidden, p[f"{name}.down"])
    mixed = torch.einsum("ne,end->nd", weights, out)
    n_valid = valid.sum()
    fraction = chosen.sum(0).to(x.dtype) / (n_valid * k)
    mean_prob = (probs * valid[:, None]).sum(0) / n_valid
    return mixed, experts * (fraction * mean_prob).sum()


def block(p, name, x, mask, valid, config):
    b, t, d = x.shape
    h = config["heads"]
    dh = d // h
    proj = torch.nn.functional.silu(rms_norm(x) @ p[f"{name}.uvqk"])
    u, v, q, k = torch.split(proj, [CHANNELS * d, d, d, d], -1)

    def heads(y):
        return y.reshape(b, t, h, dh).transpose(1, 2)

    semantic = torch.nn.functional.silu(heads(q) @ heads(k).transpose(2, 3)) / config["max_len"]
    semantic = ((semantic * mask) @ heads(v)).transpose(1, 2)
    idx = torch.arange(t)
    distance = (idx[:, None] - idx[None, :]).clamp_min(0)
    positional = (p[f"{name}.position_bias"][distance] * mask[:, 0]) @ v
    channels = torch.cat([semantic, positional.reshape(b, t, h, dh)], -1).reshape(b, t, CHANNELS * d)
    x = x + layers.linear(p, f"{name}.output", rms_norm(channels) * u)
    normed = rms_norm(x)
    if config["experts"] == 0:
        return x + swiglu(normed @ p[f"{name}.ffn.up"]) @ p[f"{name}.ffn.down"], 0.0
    mixed, lb = moe(p, f"{name}.moe", normed.reshape(b * t, d), valid.reshape(-1), config["k"])
    return x + mixed.reshape(b, t, d), config["balance"] * lb


def loss(p, inputs, rows, targets, config):
    """Training loss of one batch (dropout off): cross-entropy plus the experts' load balance."""
    tables = p["item_tables"]
    h, _, dh = tables.shape
    d = h * dh
    b, t = inputs.shape
    x = tables[:, inputs].permute(1, 2, 0, 3).reshape(b, t, d) * (inputs != 0)[..., None]
    x = x * math.sqrt(d) + p["positions"][layers.positions(t, config["max_len"])]
    mask = torch.exp(layers.attention_bias(inputs))
    valid = inputs != 0
    balance = 0.0
    for i in range(config["blocks"]):
        x, lb = block(p, f"block{i}", x, mask, valid, config)
        balance = balance + lb
    state = x.reshape(b * t, d)[rows]
    scale = 1.0 / config["temperature"]
    if "gate.weight" in p:
        user = l2_normalize(state.reshape(-1, h, dh)) * scale
        ce = layers.cross_entropy(user, layers.linear(p, "gate", state), l2_normalize(tables), targets, "logits")
    else:
        table = tables.permute(1, 0, 2).reshape(-1, d)
        ce = layers.cross_entropy(l2_normalize(state)[:, None] * scale, None, l2_normalize(table), targets, "logits")
    return ce + balance
