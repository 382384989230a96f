"""SASRec in PyTorch (models/src/sasrec.rs)."""

from . import layers


def loss(p, inputs, rows, targets, config):
    """Training loss of one batch: `rows` are flat `b * T + t` positions with `targets`."""
    x, _ = layers.encode(p, inputs, config["blocks"], config["heads"], config["max_len"])
    x = layers.layer_norm(x, p["final_norm.gain"], p["final_norm.bias"])
    user = x.reshape(-1, x.shape[-1])[rows][:, None]
    return layers.cross_entropy(user, None, p["items"], targets, "logits")
