"""Finite-difference gradient checks: the harness (the registered checks live in moe_np/checks/).

A backward pass computes the vector-Jacobian product  dL/dx = J(x)^T dout.
We verify it against central differences of the projected scalar
L(x) = sum(f(x) * dout), with a random (never all-ones) upstream gradient:

    dL/dx_i  ~=  sum((f(x + h e_i) - f(x - h e_i)) * dout) / (2 h)

Every check runs in float64; `rel_error` below 1e-7 is the pass mark.
Functions that have kinks (ReLU at 0, top-k selection, capacity drops) take a
`selection` callable: it returns the discrete choices the forward made, and
every perturbed evaluation must make the same choices as the unperturbed one,
or the check raises instead of reporting a meaningless number.
"""
from __future__ import annotations

from dataclasses import dataclass, asdict
from typing import Callable

import numpy as np

TOLERANCE = 1e-7


def rel_error(a, b) -> float:
    """max over entries of |a - b| / max(1e-8, |a| + |b|).   a, b: same shape."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"rel_error: shapes differ, a {a.shape} vs b {b.shape}")
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a - b) / np.maximum(1e-8, np.abs(a) + np.abs(b))))


def _projected_difference(plus, minus, dout) -> float:
    """sum((plus - minus) * dout), for arrays or tuples of arrays.

    Differencing before summing lets entries that did not move cancel
    exactly, so their rounding never reaches the estimate."""
    if isinstance(plus, tuple):
        return sum(_projected_difference(p, m, d) for p, m, d in zip(plus, minus, dout))
    return float(np.sum((np.asarray(plus) - np.asarray(minus)) * dout))


def _same_selection(a, b) -> bool:
    if isinstance(a, tuple):
        return all(_same_selection(x, y) for x, y in zip(a, b))
    return np.array_equal(a, b)


def numerical_grad(f: Callable, x: np.ndarray, dout, h: float = 1e-3,
                   selection: Callable | None = None) -> np.ndarray:
    """Central-difference gradient of sum(f() * dout) with respect to x.

    f takes no arguments and reads x, which is perturbed in place one entry
    at a time and restored. dout matches f's output (array or tuple).
    Each entry is the central difference
        D(h) = sum((f(x + h e_i) - f(x - h e_i)) * dout) / (2 h)
    taken at h and h/2 and combined by Richardson extrapolation,
    (4 D(h/2) - D(h)) / 3, which cancels the h^2 error term: the estimate is
    then accurate to ~1e-12 even for gradient entries near 1e-5, where
    rel_error's per-entry denominator is unforgiving. The default h = 1e-3
    balances the h^4 truncation against rounding (~1e-16 |f| / h).
    selection(), if given, must return the same discrete choices at every
    perturbed point as at x itself, else ValueError (a kink was crossed).
    """
    if x.dtype != np.float64:
        raise ValueError(f"numerical_grad: x must be float64, got {x.dtype}")
    base = selection() if selection is not None else None

    def evaluate(idx, value):
        x[idx] = value
        out = f()
        if selection is not None and not _same_selection(selection(), base):
            raise ValueError(f"numerical_grad: the selection changed at x{list(idx)} = "
                             f"{value!r}; the inputs need a wider margin at the kink")
        return out

    def central(idx, old, step):
        plus, minus = evaluate(idx, old + step), evaluate(idx, old - step)
        return _projected_difference(plus, minus, dout) / (2 * step)

    grad = np.zeros_like(x)                              # same shape as x
    for idx in np.ndindex(x.shape):
        old = x[idx]
        try:
            coarse, fine = central(idx, old, h), central(idx, old, h / 2)
        finally:
            x[idx] = old
        grad[idx] = (4 * fine - coarse) / 3
    return grad


@dataclass
class CheckResult:
    """One row of a gradient-check table."""
    name: str          # which forward/backward pair
    wrt: str           # with respect to which input or parameter
    rel_error: float   # max relative error, analytic vs numerical
    passed: bool       # rel_error < TOLERANCE
    abs_error: float = 0.0   # max |analytic - numerical|: shows when a large rel_error
                             # comes from a near-zero entry (the estimate's floor is ~1e-13)

    def as_dict(self) -> dict:
        return asdict(self)


def random_like(out, rng: np.random.Generator):
    """A random float64 upstream gradient shaped like out (array or tuple)."""
    if isinstance(out, tuple):
        return tuple(random_like(o, rng) for o in out)
    return rng.standard_normal(np.shape(out))


def check_pair(name: str, forward: Callable, backward: Callable, inputs: dict,
               wrt: list[str] | None = None, static: dict | None = None,
               seed: int = 0, h: float = 1e-3,
               selection: Callable | None = None) -> list[CheckResult]:
    """Check a forward/backward pair against central differences.

    forward(**inputs, **static) -> (out, cache)
    backward(dout, cache)       -> one gradient per name in wrt, in order
                                   (a tuple, or a dict keyed by name)
    inputs are float64 arrays (perturbed); static are passed unchanged.
    selection(**inputs, **static), if given, returns the forward's discrete
    choices, which must not change under any +-h perturbation.
    Returns one CheckResult per name in wrt (default: every input).
    """
    static = static or {}
    wrt = list(inputs) if wrt is None else wrt
    inputs = {k: np.array(v, dtype=np.float64) for k, v in inputs.items()}
    rng = np.random.default_rng(seed)
    out, cache = forward(**inputs, **static)
    dout = random_like(out, rng)
    grads = backward(dout, cache)
    if isinstance(grads, dict):
        grads = [grads[k] for k in wrt]
    elif not isinstance(grads, tuple):
        grads = (grads,)
    if len(grads) != len(wrt):
        raise ValueError(f"check_pair({name}): backward returned {len(grads)} "
                         f"gradients for wrt={wrt}")

    def f():
        return forward(**inputs, **static)[0]

    pick = None if selection is None else (lambda: selection(**inputs, **static))
    rows = []
    for key, analytic in zip(wrt, grads):
        numeric = numerical_grad(f, inputs[key], dout, h=h, selection=pick)
        err = rel_error(analytic, numeric)
        abs_err = float(np.max(np.abs(analytic - numeric))) if numeric.size else 0.0
        rows.append(CheckResult(name, key, err, err < TOLERANCE, abs_err))
    return rows


def format_table(rows: list[CheckResult]) -> str:
    """name | with respect to | max rel error | max abs error | pass, as aligned text."""
    head = ("name", "with respect to", "max rel error", "max abs error", "pass")
    body = [(r.name, r.wrt, f"{r.rel_error:.2e}", f"{r.abs_error:.1e}", "ok" if r.passed else "FAIL")
            for r in rows]
    widths = [max(len(str(line[i])) for line in [head] + body) for i in range(len(head))]
    lines = [" | ".join(str(c).ljust(w) for c, w in zip(line, widths))
             for line in [head] + body]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


# ----------------------------------------------------------------------------
# Side-by-side comparison of intermediates (exact | close | maxdiff | shape ok).

@dataclass
class Comparison:
    """How an array I computed compares with a reference."""
    name: str
    exact: bool        # bit-for-bit equal
    close: bool        # np.allclose(mine, ref, rtol=1e-7, atol=1e-12)
    maxdiff: float     # max |mine - ref| (inf when the shapes differ)
    shape_ok: bool     # mine.shape == ref.shape

    def __str__(self) -> str:
        return (f"{self.name:<12} | exact: {self.exact!s:<5} | close: {self.close!s:<5} | "
                f"maxdiff: {self.maxdiff:.1e} | shape ok: {self.shape_ok}")


def compare(name: str, mine, ref) -> Comparison:
    """Compare an intermediate with its reference: the `cmp` line of a chapter."""
    mine, ref = np.asarray(mine), np.asarray(ref)
    if mine.shape != ref.shape:
        return Comparison(name, False, False, float("inf"), False)
    maxdiff = float(np.max(np.abs(mine - ref))) if mine.size else 0.0
    return Comparison(name, bool(np.array_equal(mine, ref)),
                      bool(np.allclose(mine, ref, rtol=1e-7, atol=1e-12)), maxdiff, True)
