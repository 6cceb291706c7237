"""Models built from the layer pairs, each a Layer (the protocol of layer.py).

Every model has `params` and `grads` (dicts name -> array, same keys),
`forward(x) -> y` (which keeps what backward needs), `backward(dy,
aux_scale=1.0) -> dx` (which stores fresh gradients in `grads`), `aux` and
`routing_stats()`. The containers (Sequential, ResidualNet) get `aux` and
`routing_stats()` from their children through the base class.

    MLP, Linear, Sequential      the small building blocks of chapters 1-4
    FFN                          a dense feed-forward block, shaped as one expert
    ResidualNet                  embed -> B blocks x + f(x) -> head (chapter 7)
    moe_net, dense_net           a ResidualNet of SparseMoE or FFN blocks
    dense_width                  the FFN width that matches a sparse block's parameters
"""
from __future__ import annotations

import numpy as np

from moe_np import layers, validate
from moe_np.config import SparseConfig
from moe_np.experts import expert_kind, init_experts
from moe_np.layer import Layer
from moe_np.sparse import SparseMoE


def he_init(rng, fan_in: int, shape, dtype=np.float64):
    """Normal(0, 2 / fan_in): keeps ReLU activations at unit scale."""
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(dtype)


class MLP(Layer):
    """Two-layer network: y = relu(x W1 + b1) W2 + b2.

    x: (N, D)  W1: (D, H)  b1: (H,)  W2: (H, V)  b2: (V,)  ->  y: (N, V)
    """

    def __init__(self, d_in: int, hidden: int, d_out: int, *, seed: int = 0, dtype=np.float64):
        super().__init__(dtype)
        validate.sizes("MLP", d_in=d_in, hidden=hidden, d_out=d_out)
        validate.integer("MLP", "seed", seed, minimum=0)
        dtype, rng = self.dtype, np.random.default_rng(seed)
        self.params = {
            "w1": he_init(rng, d_in, (d_in, hidden), dtype),     # (D, H)
            "b1": np.zeros(hidden, dtype=dtype),                 # (H,)
            "w2": he_init(rng, hidden, (hidden, d_out), dtype),  # (H, V)
            "b2": np.zeros(d_out, dtype=dtype),                  # (V,)
        }
        self.init_grads()

    def forward(self, x):
        p = self.params
        a, c1 = layers.linear_forward(x, p["w1"], p["b1"])   # (N, H)
        h, c2 = layers.relu_forward(a)                       # (N, H)
        y, c3 = layers.linear_forward(h, p["w2"], p["b2"])   # (N, V)
        self._cache = (c1, c2, c3)
        return y                                             # (N, V)

    def backward(self, dy, aux_scale: float = 1.0):
        """dx (N, D); aux_scale is accepted by every layer (this one has no aux loss)."""
        self.check_backward(dy, aux_scale)
        c1, c2, c3 = self._cache
        dh, dw2, db2 = layers.linear_backward(dy, c3)        # (N, H), (H, V), (V,)
        da = layers.relu_backward(dh, c2)                    # (N, H)
        dx, dw1, db1 = layers.linear_backward(da, c1)        # (N, D), (D, H), (H,)
        self.set_grads({"w1": dw1, "b1": db1, "w2": dw2, "b2": db2})
        return dx


class Linear(Layer):
    """y = x W + b as a layer.   x: (N, D_in) -> y: (N, D_out);  W ~ Normal(0, 1 / D_in)."""

    def __init__(self, d_in: int, d_out: int, *, seed: int = 0, dtype=np.float64):
        super().__init__(dtype)
        validate.sizes("Linear", d_in=d_in, d_out=d_out)
        validate.integer("Linear", "seed", seed, minimum=0)
        dtype, rng = self.dtype, np.random.default_rng(seed)
        self.params = {"w": (rng.standard_normal((d_in, d_out)) / np.sqrt(d_in)).astype(dtype),
                       "b": np.zeros(d_out, dtype=dtype)}                # (D_in, D_out), (D_out,)
        self.init_grads()

    def forward(self, x):
        y, self._cache = layers.linear_forward(x, self.params["w"], self.params["b"])
        return y                                                   # (N, D_out)

    def backward(self, dy, aux_scale: float = 1.0):
        """dx (N, D_in); aux_scale is accepted by every layer (this one has no aux loss)."""
        self.check_backward(dy, aux_scale)
        dx, dw, db = layers.linear_backward(dy, self._cache)
        self.set_grads({"w": dw, "b": db})
        return dx


def _check_parts(owner: str, parts, dtype) -> None:
    """Every part is a Layer of the container's dtype (a mix would fail only at the first forward)."""
    for name, part in parts.items():
        if not isinstance(part, Layer):
            raise ValueError(f"{owner}: part {name} must be a Layer, got {type(part).__name__}")
        if part.dtype != dtype:
            raise ValueError(f"{owner}: part {name} ({type(part).__name__}) is {part.dtype} "
                             f"but the container is {np.dtype(dtype)}")


class Sequential(Layer):
    """Layers applied in order; backward runs them in reverse.

    params and grads are flat dicts named "<index>.<name>", the very arrays
    of each layer, so an optimizer over `params` updates the layers;
    train()/eval() reach every layer. Every layer has one dtype, the
    container's; `aux` and `routing_stats()` come from the layers (names "0", "1", ...).
    """

    def __init__(self, *modules):
        if not modules:
            raise ValueError("Sequential: give at least one layer")
        super().__init__(getattr(modules[0], "dtype", np.float64))
        self.modules = modules
        _check_parts("Sequential", self.children(), self.dtype)
        self.params = {f"{i}.{k}": v for i, m in enumerate(modules) for k, v in m.params.items()}
        self._collect_grads()

    def children(self) -> dict:
        return {str(i): m for i, m in enumerate(self.modules)}

    def _collect_grads(self):
        self.grads = {f"{i}.{k}": g for i, m in enumerate(self.modules) for k, g in m.grads.items()}

    def forward(self, x):
        for m in self.modules:
            x = m.forward(x)
        self._cache = x.shape                        # the output's shape: backward checks dy against it
        return x

    def backward(self, dy, aux_scale: float = 1.0):
        """dx; aux_scale reaches every layer (a loss scaler's scale on the auxiliary losses)."""
        aux_scale = self.check_backward(dy, aux_scale)
        validate.shape("Sequential.backward", "dy", dy, self._cache)
        for m in reversed(self.modules):
            dy = m.backward(dy, aux_scale=aux_scale)
        self._collect_grads()
        return dy


# ---------------------------------------------------------------------------
# Residual networks whose feed-forward blocks are sparse MoE layers or dense FFNs.

def ffn_size(kind: str, d_model: int, d_hidden: int) -> int:
    """Parameters of one feed-forward expert: mlp 2DH + H + D, swiglu 3DH."""
    expert_kind(kind)
    if kind == "mlp":
        return 2 * d_model * d_hidden + d_hidden + d_model
    return 3 * d_model * d_hidden


DENSE_MATCHES = ("active", "total")


def dense_width(config: SparseConfig, match: str) -> int:
    """Hidden width H' of a dense FFN with as many parameters as one sparse block.

    match "active": router + K experts + shared experts (what one token uses);
    match "total":  router + E experts + shared experts (what is stored).
    H' is the width whose ffn_size comes closest (the router counts, since
    every token runs it). Expert choice uses capacity_factor experts per token.
    """
    validate.one_of("dense_width", "match", match, DENSE_MATCHES)
    one = ffn_size(config.expert, config.d_model, config.d_hidden)
    router = config.d_model * config.num_experts * (2 if config.router == "noisy_topk" else 1)
    per_token = config.capacity_factor if config.router == "expert_choice" else config.k
    experts = config.num_experts if match == "total" else per_token
    target = router + (experts + config.num_shared) * one
    d = config.d_model
    width = (target - d) / (2 * d + 1) if config.expert == "mlp" else target / (3 * d)
    return max(1, int(round(width)))


class FFN(Layer):
    """A dense feed-forward block: one expert of the same kind and initialisation.

        y = relu(x W1 + b1) W2 + b2   (mlp)   or   (silu(x Wg) * (x Wu)) Wd   (swiglu)

    x: (N, D) -> y: (N, D). Weights are stored with a leading expert axis of
    1 (W1: (1, D, H)), so the dense baseline is exactly an expert, and the
    comparison with a sparse layer differs only in the routing.
    """

    def __init__(self, d_model: int, d_hidden: int, expert: str = "mlp", *, seed: int = 0,
                 dtype=np.float64):
        super().__init__(dtype)
        validate.sizes("FFN", d_model=d_model, d_hidden=d_hidden)
        validate.integer("FFN", "seed", seed, minimum=0)
        self.kind, self.d_model = expert_kind(expert), d_model
        self.params = init_experts(expert, 1, d_model, d_hidden, np.random.default_rng(seed),
                                   self.dtype)
        self.init_grads()

    def forward(self, x):
        y, self._cache = self.kind.forward(x, *(self.params[k] for k in self.kind.names))   # (1, N, D)
        return y[0]                                                       # (N, D)

    def backward(self, dy, aux_scale: float = 1.0):
        """dx (N, D); aux_scale is accepted by every layer (this one has no aux loss)."""
        self.check_backward(dy, aux_scale)
        dx, *grads = self.kind.backward(dy[None], self._cache)            # (N, D)
        self.set_grads(dict(zip(self.kind.names, grads)))
        return dx


class ResidualNet(Layer):
    """embed -> B residual blocks -> head, for classification (d_out = V) or regression.

        h_0 = x W_in + b_in;   h_b = h_{b-1} + f_b(h_{b-1});   y = h_B W_out + b_out

    x: (N, D_in) -> y: (N, D_out); h: (N, D). Each f_b is a SparseMoE or an
    FFN; their children keys are "embed", "block0".."block{B-1}", "head", so
    state_dict() covers every parameter, buffer and RNG stream. `params` and
    `grads` are flat dicts "<child>.<name>" over the children's own arrays.
    After a forward, `aux` is the sum of the blocks' auxiliary losses and
    `routing_stats()` lists [("block<b>", RoutingStats)] of the routed blocks
    (both from the base class). backward(dy, aux_scale) passes aux_scale to
    every block (a loss scaler's scale). Every block has the net's dtype.
    """

    def __init__(self, d_in: int, d_model: int, d_out: int, blocks, *, seed: int = 0,
                 dtype=np.float64):
        super().__init__(dtype)
        self.blocks = list(blocks)
        if not self.blocks:
            raise ValueError("ResidualNet: give at least one block")
        self.embed = Linear(d_in, d_model, seed=seed, dtype=self.dtype)
        self.head = Linear(d_model, d_out, seed=seed + 1, dtype=self.dtype)
        _check_parts("ResidualNet", self.children(), self.dtype)
        for b, block in enumerate(self.blocks):
            width = getattr(getattr(block, "config", None), "d_model", getattr(block, "d_model", None))
            if width is not None and width != d_model:
                raise ValueError(f"ResidualNet: block{b} ({type(block).__name__}) has width "
                                 f"d_model={width} but the net's d_model is {d_model}")
        self.params = {f"{n}.{k}": v for n, m in self.children().items() for k, v in m.params.items()}
        self._collect_grads()

    def children(self) -> dict:
        kids = {"embed": self.embed}
        kids |= {f"block{i}": b for i, b in enumerate(self.blocks)}
        return kids | {"head": self.head}

    def _collect_grads(self):
        self.grads = {f"{n}.{k}": g for n, m in self.children().items() for k, g in m.grads.items()}

    def forward(self, x):
        h = self.embed.forward(x)                                         # (N, D)
        for block in self.blocks:
            h = h + block.forward(h)                                      # (N, D)
        y = self.head.forward(h)                                          # (N, D_out)
        self._cache = y.shape                        # the output's shape: backward checks dy against it
        return y

    def backward(self, dy, aux_scale: float = 1.0):
        aux_scale = self.check_backward(dy, aux_scale)
        validate.shape("ResidualNet.backward", "dy", dy, self._cache)
        dh = self.head.backward(dy)                                       # (N, D)
        for block in reversed(self.blocks):
            dh = dh + block.backward(dh, aux_scale=aux_scale)             # (N, D)
        dx = self.embed.backward(dh)                                      # (N, D_in)
        self._collect_grads()
        return dx

    def active_params(self) -> int:
        """Parameters one token uses: everything but the experts it was not routed to.

        A sparse block's routed experts count K/E of their size (expert
        choice: capacity_factor/E); router and shared experts count fully."""
        total = self.num_params()
        for block in self.blocks:
            if isinstance(block, SparseMoE):
                c = block.config
                per_token = c.capacity_factor if c.router == "expert_choice" else c.k
                routed = sum(block.params[k].size for k in expert_kind(c.expert).names)
                total -= routed * (1.0 - per_token / c.num_experts)
        return int(round(total))


def moe_net(d_in: int, d_out: int, config: SparseConfig, num_blocks: int = 2, seed: int = 0,
            dtype=np.float64) -> ResidualNet:
    """ResidualNet whose B blocks are SparseMoE(config) (each with its own seed)."""
    seeds = _block_seeds("moe_net", num_blocks, seed)
    return ResidualNet(d_in, config.d_model, d_out,
                       [SparseMoE(config, seed=s, dtype=dtype) for s in seeds], seed=seed, dtype=dtype)


def dense_net(d_in: int, d_out: int, d_model: int, d_hidden: int, num_blocks: int = 2,
              expert: str = "mlp", seed: int = 0, dtype=np.float64) -> ResidualNet:
    """ResidualNet whose B blocks are dense FFNs of width d_hidden (the baseline)."""
    seeds = _block_seeds("dense_net", num_blocks, seed)
    return ResidualNet(d_in, d_model, d_out, [FFN(d_model, d_hidden, expert, seed=s, dtype=dtype)
                                              for s in seeds], seed=seed, dtype=dtype)


def _block_seeds(fn: str, num_blocks: int, seed: int) -> list[int]:
    validate.integer(fn, "num_blocks", num_blocks)
    return [int(s) for s in np.random.default_rng(seed).integers(0, 2**31 - 2, num_blocks)]
