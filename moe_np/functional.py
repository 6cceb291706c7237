"""The numerically sensitive functions, in one place.

Softmax, log-softmax, logsumexp, sigmoid, softplus and the normal CDF/PDF
are where overflow, cancellation and rounding bite first (and where low
precision bites hardest), so they live together and are written once:

    softmax(z)     = exp(z - max z) / sum exp(z - max z)      never overflows
    logsumexp(z)   = max z + log sum exp(z - max z)
    sigmoid(x)     = 1 / (1 + e^-x) or e^x / (1 + e^x)         by the sign of x
    softplus(x)    = max(x, 0) + log1p(e^-|x|)
    Phi(z)         = (1 + erf(z / sqrt 2)) / 2,  phi(z) = e^(-z^2/2) / sqrt(2 pi)

Every function keeps the dtype it is given. Softmax backward is the
vector-Jacobian product dz = p * (g - sum(g * p)), never a (V, V) Jacobian.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from moe_np import validate


class SoftmaxCache(NamedTuple):
    p: np.ndarray           # the softmax itself, z's shape
    axis: int               # the axis it normalizes over
    temperature: float      # T


class LogSoftmaxCache(NamedTuple):
    p: np.ndarray           # softmax(z), z's shape
    axis: int


def softmax_forward(z, axis: int = -1, temperature: float = 1.0):
    """p = exp(z/T - max) / sum exp(z/T - max) along axis.   SoftmaxCache(p, axis, T)."""
    validate.positive("softmax_forward", "temperature", temperature)
    p = z / temperature                                  # same shape as z: the one new array
    np.subtract(p, p.max(axis=axis, keepdims=True), out=p)   # in place; largest entry 0
    np.exp(p, out=p)                                     # largest entry 1
    np.divide(p, p.sum(axis=axis, keepdims=True), out=p)     # sums to 1 along axis
    return p, SoftmaxCache(p, axis, temperature)


def softmax_backward(dp, cache: SoftmaxCache):
    """dz = p * (dp - sum(dp * p, axis)) / T."""
    p = cache.p                                          # z's shape
    inner = np.sum(dp * p, axis=cache.axis, keepdims=True)   # one value per softmax row
    dz = dp - inner                                      # dp's shape: the result's one array
    dz *= p                                              # p (dp - inner), the same bits
    dz /= cache.temperature
    return dz


def logsumexp(z, axis: int = -1):
    """log sum exp(z) along axis, stable for large |z|.   (N, V) -> (N,)."""
    m = z.max(axis=axis, keepdims=True)                  # (N, 1)
    e = (z - m).astype(np.result_type(z, 1.0), copy=False)   # (N, V) floats: exp in place
    return np.squeeze(m, axis) + np.log(np.exp(e, out=e).sum(axis=axis))


def log_softmax_forward(z, axis: int = -1):
    """y = z - logsumexp(z).   LogSoftmaxCache(softmax(z), axis)."""
    lse = np.expand_dims(logsumexp(z, axis), axis)       # (N, 1)
    y = z - lse                                          # same shape as z
    return y, LogSoftmaxCache(np.exp(y), axis)


def log_softmax_backward(dy, cache: LogSoftmaxCache):
    """dz = dy - softmax(z) * sum(dy, axis)."""
    return dy - cache.p * np.sum(dy, axis=cache.axis, keepdims=True)


def sigmoid(x):
    """1 / (1 + exp(-x)), accurate in both tails and free of overflow."""
    e = np.exp(-np.abs(x))                               # same shape as x, in (0, 1]
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def softplus(x):
    """log(1 + exp(x)), stable for large |x|."""
    return np.maximum(x, 0.0) + np.log1p(np.exp(-np.abs(x)))


_erf = np.frompyfunc(math.erf, 1, 1)


def normal_cdf(z):
    """Phi(z) = (1 + erf(z / sqrt 2)) / 2, with math.erf (exact to float64), in z's dtype."""
    z = np.asarray(z)
    exact = np.asarray(_erf(z.astype(np.float64) / math.sqrt(2.0)), dtype=np.float64)   # as z
    return (0.5 * (1.0 + exact)).astype(z.dtype)


def normal_pdf(z):
    """phi(z) = exp(-z^2 / 2) / sqrt(2 pi)."""
    return np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
