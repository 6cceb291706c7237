"""Module: the state every layer and model keeps (layer.py adds the forward/backward protocol).

A module holds three dicts of arrays and one of random streams, and knows its children:

    params    trained by gradient        (name -> array, updated in place)
    grads     one array per param        (same keys, same dtype and shape)
    buffers   state that is not trained  (the selection bias, for example)
    rngs      named random streams       (noise, dropout masks, drop order)

`state_dict()` flattens everything a resume needs into one dict of arrays
(children's keys prefixed "<child>."), and `load_state_dict(sd)` puts it
back strictly: a missing key, an unexpected key, or a shape or dtype that
differs raises a ValueError naming the key, and nothing is changed unless
every key is right.
"""
from __future__ import annotations

import numpy as np

RNG_PREFIX = "rng."


def rng_state(gen: np.random.Generator) -> np.ndarray:
    """A PCG64 generator's whole state as 6 uint64 words (state hi/lo, inc hi/lo, cached half)."""
    st = gen.bit_generator.state
    if st["bit_generator"] != "PCG64":
        raise ValueError(f"rng_state: only PCG64 generators are saved, got {st['bit_generator']}")
    s, inc = st["state"]["state"], st["state"]["inc"]
    mask = (1 << 64) - 1
    return np.array([s >> 64, s & mask, inc >> 64, inc & mask, st["has_uint32"], st["uinteger"]],
                    dtype=np.uint64)                                   # (6,)


def set_rng_state(gen: np.random.Generator, words: np.ndarray) -> None:
    """Inverse of rng_state: the generator continues exactly where the saved one was."""
    w = [int(v) for v in words]
    gen.bit_generator.state = {"bit_generator": "PCG64",
                               "state": {"state": (w[0] << 64) | w[1], "inc": (w[2] << 64) | w[3]},
                               "has_uint32": w[4], "uinteger": w[5]}


def check_state_dict(owner: str, expected: dict, given: dict) -> None:
    """Strict comparison of a state dict against the one `owner` would write.

    Raises ValueError naming the first missing key, unexpected key, or key
    whose shape or dtype differs. Returns None when `given` fits exactly.
    """
    if not isinstance(given, dict):
        raise ValueError(f"{owner}.load_state_dict: expected a dict of arrays, got {type(given).__name__}")
    missing = sorted(set(expected) - set(given))
    if missing:
        raise ValueError(f"{owner}.load_state_dict: missing key {missing[0]!r}"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    unexpected = sorted(set(given) - set(expected))
    if unexpected:
        raise ValueError(f"{owner}.load_state_dict: unexpected key {unexpected[0]!r}"
                         + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    for key, ref in expected.items():
        got = np.asarray(given[key])
        if got.shape != ref.shape or got.dtype != ref.dtype:
            raise ValueError(f"{owner}.load_state_dict: key {key!r} has shape {got.shape} dtype "
                             f"{got.dtype}, expected shape {ref.shape} dtype {ref.dtype}")


class Module:
    """Base class: params, grads, buffers, rngs, children, train/eval, state_dict."""

    def __init__(self):
        self.params: dict[str, np.ndarray] = {}
        self.grads: dict[str, np.ndarray] = {}
        self.buffers: dict[str, np.ndarray] = {}
        self.rngs: dict[str, np.random.Generator] = {}
        self.training = True

    def children(self) -> dict[str, "Module"]:
        """Named sub-modules; containers override this."""
        return {}

    def init_grads(self) -> None:
        """grads: one zero array per param, same shape and dtype (call after params are set)."""
        self.grads = {k: np.zeros_like(v) for k, v in self.params.items()}

    def set_grads(self, grads: dict) -> None:
        """Store a backward pass's fresh gradients under the params' keys."""
        if set(grads) != set(self.params):
            raise ValueError(f"{type(self).__name__}.set_grads: keys {sorted(grads)} differ from "
                             f"params {sorted(self.params)}")
        self.grads = dict(grads)

    def train(self, mode: bool = True) -> "Module":
        """Training mode (noise, dropout, state updates on) for this module and its children."""
        self.training = bool(mode)
        for child in self.children().values():
            child.train(mode)
        return self

    def eval(self) -> "Module":
        """Evaluation mode: deterministic, and no forward changes any state."""
        return self.train(False)

    def check_backward(self, dy, aux_scale=1.0) -> float:
        """Before a backward: a forward has run, dy has the layer's dtype (self.dtype) and
        aux_scale is a finite number (the upstream gradient of the aux loss: a loss scaler's
        scale in training, any value in a gradient check).   -> aux_scale as a Python float, so that a NumPy
        float64 scale never upcasts a float32 layer's gradients."""
        name = type(self).__name__
        if getattr(self, "_cache", None) is None:
            raise ValueError(f"{name}.backward: call forward first")
        if dy.dtype != self.dtype:
            raise ValueError(f"{name}.backward: dy is {dy.dtype} but the layer is {self.dtype}")
        scale = float(aux_scale)
        if not np.isfinite(scale):
            raise ValueError(f"{name}.backward: aux_scale must be a finite number, got {aux_scale!r}")
        return scale

    def num_params(self) -> int:
        return int(sum(p.size for p in self.params.values()))

    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of params, buffers and RNG states; children's keys as '<child>.<key>'."""
        kids = self.children()
        if kids:
            return {f"{name}.{k}": v for name, child in kids.items()
                    for k, v in child.state_dict().items()}
        sd = {k: v.copy() for k, v in self.params.items()}
        sd |= {k: v.copy() for k, v in self.buffers.items()}
        sd |= {RNG_PREFIX + k: rng_state(g) for k, g in self.rngs.items()}
        return sd

    def load_state_dict(self, sd: dict) -> None:
        """Strictly restore what state_dict wrote (params in place, so optimizers stay bound)."""
        check_state_dict(type(self).__name__, self.state_dict(), sd)
        self._load_checked(sd)

    def _load_checked(self, sd: dict) -> None:
        kids = self.children()
        if kids:
            for name, child in kids.items():
                prefix = name + "."
                child._load_checked({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)})
            return
        for k in self.params:
            self.params[k][...] = sd[k]
        for k in self.buffers:
            self.buffers[k][...] = sd[k]
        for k, g in self.rngs.items():
            set_rng_state(g, sd[RNG_PREFIX + k])
