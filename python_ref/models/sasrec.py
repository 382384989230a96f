"""SASRec in PyTorch (models/src/sasrec.rs)."""

from . import layers


def query(p, inputs, rows, config, drop=layers.no_dropout):
    """The catalog scorer's inputs at `rows` (flat `b * T + t` positions):
    user states `[R, 1, D]`, no gate, the shared item table, Logits mixing."""
    x, _ = layers.encode(p, inputs, config["blocks"], config["heads"], config["max_len"], drop)
    x = layers.layer_norm(x, p["final_norm.gain"], p["final_norm.bias"])
    user = x.reshape(-1, x.shape[-1])[rows][:, None]
    return user, None, p["items"], "logits"


def loss(p, inputs, rows, targets, config, drop=layers.no_dropout):
    """Training loss of one batch: `rows` are flat `b * T + t` positions with `targets`."""
    return layers.query_loss(query(p, inputs, rows, config, drop), targets)
