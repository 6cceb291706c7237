"""Adam's update as one compiled pass per parameter, bit for bit optim.Adam's NumPy step.

    adam_update(p, g, m, v, hyper)   p, m, v updated in place from g (one loop over the entries)

optim.Adam.step in NumPy makes about a dozen passes over each parameter
(the moments, the bias corrections, the square root, the decay), each a
call with its temporary; at chapter 9's size that is a millisecond a step,
for arithmetic that needs one read of p, g, m, v and one write of p, m, v.
The loop makes the same float operations in the same order, in the
arrays' dtype, with every Python-float hyperparameter rounded to that dtype
as NumPy rounds a Python scalar it meets (NEP 50), so the bits are NumPy's
(the tests compare them). An entry's update reads no other entry, so
fusing the passes changes no order. No fused multiply-add: Numba does not
contract without fastmath. `adam_update` validates its arrays at the
Python boundary; with NUMBA_DISABLE_JIT=1 the loop runs as plain Python.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit

DTYPES = (np.float32, np.float64)


class AdamHyper(NamedTuple):
    """One step's hyperparameters as Python floats, as optim.Adam.step uses them."""
    b1: float
    b2: float
    lr: float
    eps: float
    weight_decay: float
    t: int               # the step being taken, from 1


@njit(cache=True, nogil=True, error_model="numpy")
def adam_rows(p, g, m, v, b1, c1, b2, c2, bc1, lr, bc2, eps, decay, use_decay):
    """For every entry: m <- m b1 + c1 g;  v <- v b2 + (c2 g) g;  step = (m / bc1) lr /
    (sqrt(v / bc2) + eps);  p <- p - decay p (if use_decay);  p <- p - step.   All (S,)."""
    for i in range(p.size):
        gi = g[i]
        mi = m[i] * b1
        mi = mi + c1 * gi
        m[i] = mi
        vi = v[i] * b2
        vi = vi + (c2 * gi) * gi
        v[i] = vi
        step = (mi / bc1) * lr
        step = step / (np.sqrt(vi / bc2) + eps)
        pi = p[i]
        if use_decay:
            pi = pi - decay * pi
        p[i] = pi - step


def takes(p, g, m, v, hyper: AdamHyper) -> bool:
    """Whether adam_update reproduces NumPy here: C-contiguous float32 / float64 arrays of one
    shape and dtype, p, m, v writeable, none of g, m, v sharing memory with another or with p
    (NumPy's passes would see each other's writes; g may be p), and Python floats (a NumPy
    scalar would make NumPy compute in its own type)."""
    arrays = (p, g, m, v)
    return all(isinstance(a, np.ndarray) and a.dtype == p.dtype and a.shape == p.shape
               and a.flags.c_contiguous for a in arrays) and p.dtype in DTYPES \
        and all(a.flags.writeable for a in (p, m, v)) \
        and all(type(x) in (float, int) for x in hyper) \
        and not any(np.may_share_memory(a, b) for a, b in
                    ((g, m), (g, v), (m, v), (p, m), (p, v)))


def adam_update(p, g, m, v, hyper: AdamHyper, strict: bool = True) -> bool:
    """One Adam(W) step of p (in place, with its moments m, v) from g: optim.Adam.step's bits.
    -> True. Arrays it does not take (see `takes`) raise a ValueError, or with strict=False
    return False with nothing written (the caller then runs the twin)."""
    if not takes(p, g, m, v, hyper):
        if not strict:
            return False
        got = ", ".join(f"{n} {getattr(a, 'dtype', type(a).__name__)} {getattr(a, 'shape', '')}"
                        for n, a in zip("pgmv", (p, g, m, v)))
        raise ValueError(f"adam_update: p, g, m, v must be C-contiguous float32/float64 arrays of "
                         f"one shape and dtype (p, m, v writeable) and the hyperparameters Python "
                         f"numbers, got {got}; {hyper}")
    kind, h = p.dtype.type, hyper
    adam_rows(p.reshape(-1), g.reshape(-1), m.reshape(-1), v.reshape(-1), kind(h.b1), kind(1 - h.b1),
              kind(h.b2), kind(1 - h.b2), kind(1 - h.b1 ** h.t), kind(h.lr), kind(1 - h.b2 ** h.t),
              kind(h.eps), kind(h.lr * h.weight_decay), bool(h.weight_decay))
    return True
