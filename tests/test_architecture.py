"""Cross-cutting contracts of the package: dtypes, state dicts, train/eval, the public surface.

These pin how the parts are wired, independently of the gradient checks.
"""
from dataclasses import replace

import numpy as np
import pytest

import moe_np
from moe_np import DenseConfig, DenseMoE, SparseConfig, SparseMoE
from moe_np.config import GATE_KINDS, ROUTER_KINDS
from moe_np.models import MLP, Linear, Sequential
from moe_np.optim import SGD, Adam, AdamW

D, E, H = 6, 4, 5


def sparse_config(router, **fields):
    base = dict(d_model=D, num_experts=E, d_hidden=H, router=router, k=1 if router == "switch" else 2,
                capacity_factor=1.0, num_shared=1)
    if router in ("softmax_topk", "softmax_topk_raw", "switch", "topk_softmax"):
        base |= dict(balance_coef=0.01, z_coef=0.001)
    if router == "noisy_topk":
        base |= dict(cv_coef=0.01)
    if router == "sigmoid_bias":
        base |= dict(bias_gamma=0.01)
    return SparseConfig(**(base | fields))


def float_arrays(obj, seen=None):
    """Every float ndarray reachable from a cache (NamedTuples, tuples, lists, dicts)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        return [obj] if np.issubdtype(obj.dtype, np.floating) else []
    if isinstance(obj, dict):
        return [a for v in obj.values() for a in float_arrays(v, seen)]
    if isinstance(obj, (tuple, list)):
        return [a for v in obj for a in float_arrays(v, seen)]
    return []


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("router", ROUTER_KINDS)
@pytest.mark.parametrize("expert", ["mlp", "swiglu"])
def test_sparse_layer_keeps_its_dtype_everywhere(router, expert, dtype):
    """Breaks if any step allocates float64 (np.zeros(shape)) or mixes in a float64 constant."""
    layer = SparseMoE(sparse_config(router, expert=expert), seed=0, dtype=dtype)
    x = np.random.default_rng(0).standard_normal((16, D)).astype(dtype)
    y = layer.forward(x)
    dx = layer.backward(np.ones_like(y) * 0.5)
    assert y.dtype == dx.dtype == dtype
    assert all(g.dtype == dtype for g in layer.grads.values())
    assert all(b.dtype == dtype for b in layer.buffers.values())
    cached = float_arrays(tuple(layer._cache))
    assert cached and all(a.dtype == dtype for a in cached), {a.dtype for a in cached}
    assert isinstance(layer.aux, float)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("gate", GATE_KINDS)
@pytest.mark.parametrize("expert", ["mlp", "swiglu"])
def test_dense_layer_keeps_its_dtype_everywhere(gate, expert, dtype):
    config = DenseConfig(d_model=D, num_experts=E, d_hidden=H, gate=gate, expert=expert,
                         gate_dropout=0.2)
    layer = DenseMoE(config, seed=0, dtype=dtype)
    x = np.random.default_rng(0).standard_normal((7, D)).astype(dtype)
    y = layer.forward(x)
    dx = layer.backward(np.full_like(y, 0.3))
    assert y.dtype == dx.dtype == dtype
    assert all(g.dtype == dtype for g in layer.grads.values())
    cached = float_arrays(tuple(layer._cache))
    assert all(a.dtype == dtype for a in cached), {a.dtype for a in cached}


def test_a_float64_input_to_a_float32_layer_is_refused():
    layer = SparseMoE(sparse_config("softmax_topk"), dtype=np.float32)
    with pytest.raises(ValueError, match="x is float64 but the parameters are float32"):
        layer.forward(np.zeros((3, D)))
    layer.forward(np.zeros((3, D), np.float32))
    with pytest.raises(ValueError, match="dy is float64 but the layer is float32"):
        layer.backward(np.zeros((3, D)))


# -- state dicts ---------------------------------------------------------------------------

def _train_a_little(model, x, steps=3):
    opt = Adam(model.params, lr=1e-2)
    for _ in range(steps):
        y = model.forward(x)
        model.backward(0.1 * y)
        opt.step(model.grads)
    return opt


MODULES = {
    **{f"sparse[{r}]": (lambda seed, r=r: SparseMoE(sparse_config(r, drop_policy="random"), seed=seed))
       for r in ROUTER_KINDS},
    "dense[softmax,dropout]": lambda seed: DenseMoE(DenseConfig(d_model=D, num_experts=E, d_hidden=H,
                                                                gate_dropout=0.3), seed=seed),
    "mlp": lambda seed: MLP(D, 7, D, seed=seed),
    "linear": lambda seed: Linear(D, D, seed=seed),
    "sequential": lambda seed: Sequential(Linear(D, D, seed=seed),
                                          SparseMoE(sparse_config("noisy_topk"), seed=seed)),
}


@pytest.mark.parametrize("name", MODULES)
def test_state_dict_round_trip_is_bit_identical(name):
    """Breaks if a buffer or an RNG stream is left out of the state dict, or loaded by reference."""
    x = np.random.default_rng(3).standard_normal((12, D))
    a = MODULES[name](0)
    opt_a = _train_a_little(a, x)
    b = MODULES[name](1)
    opt_b = Adam(b.params, lr=1e-2)
    b.load_state_dict(a.state_dict())
    opt_b.load_state_dict(opt_a.state_dict())
    for _ in range(2):                                           # training draws from the restored streams
        ya, yb = a.forward(x), b.forward(x)
        assert np.array_equal(ya, yb)
        dy = np.cos(ya)
        assert np.array_equal(a.backward(dy), b.backward(dy))
        assert all(np.array_equal(a.grads[k], b.grads[k]) for k in a.grads)
        opt_a.step(a.grads), opt_b.step(b.grads)
    assert all(np.array_equal(a.params[k], b.params[k]) for k in a.params)


@pytest.mark.parametrize("make", [lambda p: SGD(p, 0.1, momentum=0.9), lambda p: Adam(p, 1e-2),
                                  lambda p: AdamW(p, 1e-2)])
def test_optimizer_state_dict_resumes_identically(make):
    rng = np.random.default_rng(0)
    p1, p2 = {"w": rng.standard_normal(5)}, {"w": np.zeros(5)}
    o1 = make(p1)
    for _ in range(3):
        o1.step({"w": np.sin(p1["w"])})
    p2["w"][:] = p1["w"]
    o2 = make(p2)
    o2.load_state_dict(o1.state_dict())
    for _ in range(3):
        o1.step({"w": np.sin(p1["w"])})
        o2.step({"w": np.sin(p2["w"])})
    assert np.array_equal(p1["w"], p2["w"]) and o1.t == o2.t == 6


def _bad_state_dicts(sd):
    key = next(k for k, v in sd.items() if v.ndim > 0 and np.issubdtype(v.dtype, np.floating))
    yield "missing", {k: v for k, v in sd.items() if k != key}, key
    yield "unexpected", sd | {"extra.w": np.zeros(2)}, "extra.w"
    yield "shape", sd | {key: np.zeros(sd[key].shape + (1,), sd[key].dtype)}, key
    yield "dtype", sd | {key: sd[key].astype(np.float16)}, key


@pytest.mark.parametrize("name", ["sparse[sigmoid_bias]", "dense[softmax,dropout]", "sequential"])
def test_a_bad_state_dict_names_the_key_and_changes_nothing(name):
    module = MODULES[name](0)
    before = module.state_dict()
    for kind, bad, key in _bad_state_dicts(before):
        with pytest.raises(ValueError, match=f"{kind}.*{key}|{key}.*{kind}|'{key}'"):
            module.load_state_dict(bad)
        after = module.state_dict()
        assert all(np.array_equal(before[k], after[k]) for k in before), kind


def test_optimizer_bad_state_dict():
    opt = Adam({"w": np.zeros(3)})
    with pytest.raises(ValueError, match="missing key 'm.w'"):
        opt.load_state_dict({k: v for k, v in opt.state_dict().items() if k != "m.w"})


# -- train and eval ------------------------------------------------------------------------

def test_sequential_passes_train_and_eval_on():
    """Breaks if train()/eval() does not reach the children: noise would leak into evaluation."""
    moe = SparseMoE(sparse_config("noisy_topk"), seed=0)
    net = Sequential(Linear(D, D), moe)
    net.eval()
    assert not moe.training
    x = np.random.default_rng(0).standard_normal((9, D))
    state = moe.state_dict()
    assert np.array_equal(net.forward(x), net.forward(x))
    assert all(np.array_equal(v, moe.state_dict()[k]) for k, v in state.items())   # no state moved
    net.train()
    assert moe.training and not np.array_equal(net.forward(x), net.forward(x))


def test_evaluation_leaves_the_selection_bias_alone():
    layer = SparseMoE(sparse_config("sigmoid_bias"), seed=0)
    x = np.random.default_rng(0).standard_normal((20, D))
    layer.eval().forward(x)
    assert not layer.buffers["selection_bias"].any()
    layer.train().forward(x)
    assert layer.buffers["selection_bias"].any()


# -- the public surface --------------------------------------------------------------------

def test_public_names_and_stats():
    assert {"SparseMoE", "SparseConfig", "DenseMoE", "DenseConfig"} <= set(dir(moe_np))
    layer = SparseMoE(sparse_config("softmax_topk", capacity_factor=0.5), seed=0)
    layer.forward(np.random.default_rng(0).standard_normal((10, D)))
    s = layer.stats
    assert s.ids.shape == s.weights.shape == (10, 2) and s.logits.shape == (10, E)
    assert s.counts.shape == (E,) and s.counts.sum() + s.num_dropped == 20 and s.num_dropped > 0


def test_aux_scale_scales_only_the_auxiliary_gradient():
    """backward(dy, aux_scale) must add aux_scale times the aux gradient (a loss scaler relies on it)."""
    layer = SparseMoE(sparse_config("softmax_topk", balance_coef=0.5, z_coef=0.1), seed=0)
    x = np.random.default_rng(0).standard_normal((10, D))
    y = layer.forward(x)
    dy = np.sin(y)
    grads = {}
    for scale in (0.0, 1.0, 3.0):
        layer.backward(dy, aux_scale=scale)
        grads[scale] = layer.grads["w_router"]
    aux_part = grads[1.0] - grads[0.0]
    assert np.abs(aux_part).max() > 1e-6
    assert np.allclose(grads[3.0] - grads[0.0], 3 * aux_part, rtol=1e-10, atol=1e-14)


def test_config_is_frozen_and_keyword_only():
    c = sparse_config("softmax_topk")
    with pytest.raises(Exception):
        c.k = 3
    with pytest.raises(TypeError):
        SparseConfig(D, E, H)
    assert replace(c, k=1).k == 1


# -- one list per kind, one check per rule ---------------------------------------------------

def test_every_kind_list_is_read_from_its_registry():
    from moe_np import config, dispatch, experts, gates, routers
    assert config.ROUTER_KINDS == tuple(routers.ROUTERS)
    assert config.EXPERT_KINDS == tuple(experts.EXPERTS)
    assert config.GATE_KINDS == tuple(gates.GATES)
    assert config.DROP_POLICIES == dispatch.POLICIES
    assert config.DISPATCH_STRATEGIES == dispatch.STRATEGIES
    assert config.SOFTMAX_ROUTERS == ("softmax_topk", "softmax_topk_raw", "switch", "topk_softmax")
    from moe_np import precision
    assert config.COMPUTE_FORMATS == ("fp32",) + tuple(precision.FORMATS)


@pytest.mark.parametrize("call, message", [
    (lambda v: v.one_of("f", "kind", "hash", ("a", "b")), r"f: kind must be one of \('a', 'b'\), got 'hash'"),
    (lambda v: v.integer("f", "n", True), "f: n must be an integer >= 1, got True"),
    (lambda v: v.integer("f", "n", 2.0), "f: n must be an integer >= 1, got 2.0"),
    (lambda v: v.integer("f", "n", -1, minimum=0), "f: n must be an integer >= 0, got -1"),
    (lambda v: v.sizes("f", a=3, b=0), "f: b must be an integer >= 1, got 0"),
    (lambda v: v.non_negative("f", "c", float("nan")), "f: c must be >= 0, got nan"),
    (lambda v: v.float_dtype("f", np.int64), "f: dtype must be a floating-point dtype, got int64"),
    (lambda v: v.float_dtype("f", "no such type"), "f: dtype must be a floating-point dtype"),
    (lambda v: v.param_dtype("f", "x", np.zeros(2, np.float32), np.float64),
     "f: x is float32 but the parameters are float64; convert one of them"),
])
def test_validate_names_function_argument_and_value(call, message):
    from moe_np import validate
    with pytest.raises(ValueError, match=message):
        call(validate)


def test_validate_accepts_what_it_should():
    from moe_np import validate
    validate.integer("f", "n", np.int64(3))
    validate.integer("f", "n", 0, minimum=0)
    validate.non_negative("f", "c", 0.0)
    assert validate.float_dtype("f", "float32") == np.float32


@pytest.mark.parametrize("bad, message", [
    (lambda p: (np.zeros((3, D)), {k: v for k, v in p.items() if k != "w1"}), r"params is missing \['w1'\]"),
    (lambda p: (np.zeros((0, D)), p), r"x must hold at least one token, got shape \(0, 6\)"),
    (lambda p: (np.zeros((3, D), np.float32), p), "x is float32 but the parameters are float64"),
    (lambda p: (np.zeros((3, D, 1)), p), r"x must have 2 dimensions, got shape \(3, 6, 1\)"),
])
@pytest.mark.parametrize("which", ["remoe", "soft"])
def test_remoe_and_soft_moe_share_one_input_check(which, bad, message):
    from moe_np.remoe import ReMoE, ReMoEConfig, remoe_forward
    from moe_np.soft import SoftMoE, SoftMoEConfig, soft_moe_forward
    if which == "remoe":
        params, forward = ReMoE(ReMoEConfig(d_model=D, num_experts=E, d_hidden=H)).params, remoe_forward
    else:
        params, forward = SoftMoE(SoftMoEConfig(d_model=D, num_experts=E, d_hidden=H)).params, soft_moe_forward
    fn = {"remoe": "remoe_forward", "soft": "soft_moe_forward"}[which]
    with pytest.raises(ValueError, match=f"{fn}: {message}"):
        forward(*bad(params))
