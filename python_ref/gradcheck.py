"""Finite-difference gradients for the references' tests."""

import numpy as np

__all__ = ["central_differences"]


def central_differences(f, a, step=1e-6):
    """d f() / d a by central differences, for scalar f() and every entry of
    the array `a` (perturbed in place and restored)."""
    grad = np.zeros_like(a)
    for index in np.ndindex(*a.shape):
        keep = a[index]
        a[index] = keep + step
        plus = f()
        a[index] = keep - step
        minus = f()
        a[index] = keep
        grad[index] = (plus - minus) / (2 * step)
    return grad
