"""Finite-difference gradient checks: the harness (the registered checks live in moe_np/checks/).

A backward pass computes the vector-Jacobian product  dL/dx = J(x)^T dout.
We verify it against central differences of the projected scalar
l(x) = sum(f(x) * dout), with a random (never all-ones) upstream gradient:

    D(s) = sum((f(x + s e_i) - f(x - s e_i)) * dout) / (2 s)           error ~ s^2
    R(s) = (4 D(s/2) - D(s)) / 3          Richardson extrapolation,   error ~ s^4

R(h/2) - R(h) measures R(h/2)'s s^4 error (15 times it), so the numerical
gradient is (16 R(h/2) - R(h)) / 15, from steps h, h/2 and h/4, and every
entry carries an error bar, its floor (derived in tutorials/01-gradient-checking.md):

    rounding    6.6 c eps S / h         S = sum |f(x) * dout|,  c = ROUNDING_C
    truncation  |R(h) - R(h/2)| / 15    the size of the last correction

`check_error` is rel_error with the floor in its denominator: an entry large
enough for the estimate to resolve 1 part in 1/TOLERANCE is judged relative to
its size, a smaller one against the floor. Pass: check_error < TOLERANCE.
Every check runs in float64. Functions that have kinks (ReLU at 0, top-k
selection, capacity drops) take a `selection` callable: it returns the
discrete choices the forward made, and every perturbed evaluation must make
the same choices as the unperturbed one, or the check raises instead of
reporting a meaningless number.
"""
from __future__ import annotations

from dataclasses import dataclass, asdict
from typing import Callable, NamedTuple

import numpy as np

TOLERANCE = 1e-7                     # pass mark for check_error
EPS = np.finfo(np.float64).eps       # 2^-52, the spacing of float64 numbers near 1
ROUNDING_C = 4.0                     # a forward's relative rounding error, in units of EPS
ROUNDING_GAIN = (16 * 6 + 3) / 15    # 6.6: the estimate's rounding error is <= 6.6 c EPS S / h


def rel_error(a, b) -> float:
    """max over entries of |a - b| / max(1e-8, |a| + |b|).   a, b: same shape."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"rel_error: shapes differ, a {a.shape} vs b {b.shape}")
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a - b) / np.maximum(1e-8, np.abs(a) + np.abs(b))))


def check_error(analytic, numeric, floor) -> float:
    """max over entries of |a - n| / max(|a| + |n|, floor / TOLERANCE).

    analytic, numeric: same shape; floor: the numerical estimate's error bar,
    a scalar or an array of that shape. check_error < TOLERANCE exactly when
    every entry has |a - n| < max(TOLERANCE (|a| + |n|), floor).
    """
    a = np.asarray(analytic, dtype=np.float64)
    n = np.asarray(numeric, dtype=np.float64)
    if a.shape != n.shape:
        raise ValueError(f"check_error: shapes differ, analytic {a.shape} vs numeric {n.shape}")
    floor = np.broadcast_to(np.asarray(floor, dtype=np.float64), a.shape)   # same shape as a
    if np.any(~(floor > 0)):
        raise ValueError(f"check_error: floor must be > 0 everywhere, got min {floor.min()!r}")
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a - n) / np.maximum(np.abs(a) + np.abs(n), floor / TOLERANCE)))


def rounding_floor(out, dout, h: float) -> float:
    """6.6 c eps S / h with S = sum |out * dout|: the rounding part of the estimate's error.

    out, dout: arrays or tuples of arrays (f's output and the upstream gradient)."""
    if isinstance(out, tuple):
        scale = sum(float(np.sum(np.abs(np.asarray(o) * d))) for o, d in zip(out, dout))
    else:
        scale = float(np.sum(np.abs(np.asarray(out) * dout)))
    return ROUNDING_GAIN * ROUNDING_C * EPS * max(scale, np.finfo(np.float64).tiny) / h


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


class FiniteDifference(NamedTuple):
    grad: np.ndarray         # same shape as x: (16 R(h/2) - R(h)) / 15
    truncation: np.ndarray   # same shape as x: |R(h) - R(h/2)| / 15, its truncation error bar


def finite_difference(f: Callable, x: np.ndarray, dout, h: float = 1e-3,
                      selection: Callable | None = None) -> FiniteDifference:
    """Central-difference gradient of sum(f() * dout) wrt x, with its truncation error.

    f takes no arguments and reads x, which is perturbed in place one entry
    at a time and restored. dout matches f's output (array or tuple).
    Each entry takes D(s) at s = h, h/2, h/4. R(h/2) = (4 D(h/4) - D(h/2)) / 3
    has the error -h^4 f5 / 7680 (f5: the fifth derivative along x_i), and
    R(h) = (4 D(h/2) - D(h)) / 3 sixteen times that, so (R(h) - R(h/2)) / 15
    measures it. The estimate subtracts it, (16 R(h/2) - R(h)) / 15, leaving
    an O(h^6) error, and keeps the size of that correction as the truncation
    error bar. selection(), if given, must return the same discrete choices
    at every perturbed point as at x itself, else ValueError (a kink was crossed).
    """
    if x.dtype != np.float64:
        raise ValueError(f"finite_difference: x must be float64, got {x.dtype}")
    if not h > 0:
        raise ValueError(f"finite_difference: h must be > 0, got {h!r}")
    base = selection() if selection is not None else None

    def evaluate(idx, value):
        x[idx] = value
        out = f()
        if selection is not None and not _same_selection(selection(), base):
            raise ValueError(f"finite_difference: the selection changed at x{list(idx)} = "
                             f"{value!r}; the inputs need a wider margin at the kink")
        return out

    def central(idx, old, step):
        plus, minus = evaluate(idx, old + step), evaluate(idx, old - step)
        return _projected_difference(plus, minus, dout) / (2 * step)

    grad = np.zeros_like(x)                              # same shape as x
    truncation = np.zeros_like(x)                        # same shape as x
    for idx in np.ndindex(x.shape):
        old = x[idx]
        try:
            d1, d2, d4 = (central(idx, old, h / k) for k in (1, 2, 4))
        finally:
            x[idx] = old
        coarse, fine = (4 * d2 - d1) / 3, (4 * d4 - d2) / 3
        grad[idx], truncation[idx] = (16 * fine - coarse) / 15, abs(coarse - fine) / 15
    return FiniteDifference(grad, truncation)


def numerical_grad(f: Callable, x: np.ndarray, dout, h: float = 1e-3,
                   selection: Callable | None = None) -> np.ndarray:
    """The gradient of sum(f() * dout) wrt x: finite_difference(...).grad, same shape as x."""
    return finite_difference(f, x, dout, h=h, selection=selection).grad


@dataclass
class CheckResult:
    """One row of a gradient-check table."""
    name: str          # which forward/backward pair
    wrt: str           # with respect to which input or parameter
    rel_error: float   # max |a - n| / max(1e-8, |a| + |n|), for comparison
    passed: bool       # check_error < TOLERANCE
    abs_error: float = 0.0     # max |analytic - numeric|
    check_error: float = 0.0   # max |a - n| / max(|a| + |n|, floor / TOLERANCE): decides
    floor: float = 0.0         # the largest entry's error bar (rounding + truncation)

    def as_dict(self) -> dict:
        return asdict(self)


def random_like(out, rng: np.random.Generator):
    """A random float64 upstream gradient shaped like out (array or tuple)."""
    if isinstance(out, tuple):
        return tuple(random_like(o, rng) for o in out)
    return rng.standard_normal(np.shape(out))


def check_gradient(f: Callable, x: np.ndarray, dout, analytic, h: float = 1e-3,
                   selection: Callable | None = None, name: str = "", wrt: str = "") -> CheckResult:
    """One table row: an analytic gradient of sum(f() * dout) wrt x against finite differences.

    analytic: same shape as x. The floor is rounding_floor(f(), dout, h)
    plus finite_difference's truncation estimate, entry by entry; it depends
    on f, x, dout and h only, never on the analytic gradient being judged.
    """
    fd = finite_difference(f, x, dout, h=h, selection=selection)
    analytic = np.asarray(analytic, dtype=np.float64)
    if analytic.shape != x.shape:
        raise ValueError(f"check_gradient({name} wrt {wrt}): analytic has shape "
                         f"{analytic.shape} but x has shape {x.shape}")
    floor = rounding_floor(f(), dout, h) + fd.truncation            # same shape as x
    err = check_error(analytic, fd.grad, floor)
    abs_err = float(np.max(np.abs(analytic - fd.grad))) if x.size else 0.0
    return CheckResult(name, wrt, rel_error(analytic, fd.grad), err < TOLERANCE, abs_err,
                       err, float(np.max(floor)) if x.size else 0.0)


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
    return [check_gradient(f, inputs[key], dout, analytic, h=h, selection=pick, name=name, wrt=key)
            for key, analytic in zip(wrt, grads)]


def format_table(rows: list[CheckResult]) -> str:
    """name | with respect to | check error | max rel error | max abs error | floor | pass."""
    head = ("name", "with respect to", "check error", "max rel error", "max abs error",
            "floor", "pass")
    body = [(r.name, r.wrt, f"{r.check_error:.2e}", f"{r.rel_error:.2e}", f"{r.abs_error:.1e}",
             f"{r.floor:.1e}", "ok" if r.passed else "FAIL") for r in rows]
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
