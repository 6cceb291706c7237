"""The layer protocol (moe_np/layer.py), held against every layer and model of the library.

    forward(x) -> y;  backward(dy, aux_scale=1.0) -> dx;  aux (a float);
    routing_stats() -> [(name, RoutingStats)];  ValueError before a forward.

Containers take aux and routing statistics from their children; a layer
built on a contradiction (a dtype its config cannot honour, parts of
different dtypes) fails in its constructor, not at the first forward.
"""
import numpy as np
import pytest

from moe_np import DenseConfig, DenseMoE, SparseConfig, SparseMoE
from moe_np.config import PrecisionConfig
from moe_np.layer import Layer, RoutingStats
from moe_np.models import FFN, MLP, Linear, ResidualNet, Sequential, dense_net, moe_net
from moe_np.remoe import ReMoE, ReMoEConfig
from moe_np.soft import SoftMoE, SoftMoEConfig

D, E, H, N = 6, 4, 5, 12


def sparse_config(**fields):
    return SparseConfig(**(dict(d_model=D, num_experts=E, d_hidden=H, k=2, balance_coef=0.1,
                                z_coef=0.01, dispatch="numpy") | fields))


def remoe_config():
    return ReMoEConfig(d_model=D, num_experts=E, d_hidden=H, k=2, l1_init=0.5)


# name -> (make(dtype), routed-stat names after a forward)
LAYERS = {
    "SparseMoE": (lambda dt: SparseMoE(sparse_config(), seed=1, dtype=dt), [""]),
    "DenseMoE": (lambda dt: DenseMoE(DenseConfig(d_model=D, num_experts=E, d_hidden=H), seed=1,
                                     dtype=dt), []),
    "MLP": (lambda dt: MLP(D, H, D, seed=1, dtype=dt), []),
    "Linear": (lambda dt: Linear(D, D, seed=1, dtype=dt), []),
    "FFN": (lambda dt: FFN(D, H, "swiglu", seed=1, dtype=dt), []),
    "ReMoE": (lambda dt: ReMoE(remoe_config(), seed=1, dtype=dt), [""]),
    "SoftMoE": (lambda dt: SoftMoE(SoftMoEConfig(d_model=D, num_experts=E, d_hidden=H, num_slots=2),
                                   seed=1, dtype=dt), []),
    "Sequential": (lambda dt: Sequential(Linear(D, D, seed=1, dtype=dt),
                                         SparseMoE(sparse_config(), seed=2, dtype=dt),
                                         ReMoE(remoe_config(), seed=3, dtype=dt)), ["1", "2"]),
    "ResidualNet": (lambda dt: moe_net(D, 3, sparse_config(), num_blocks=2, seed=1, dtype=dt),
                    ["block0", "block1"]),
    "ResidualNet[dense]": (lambda dt: dense_net(D, 3, D, H, num_blocks=2, seed=1, dtype=dt), []),
}


def inputs(dtype):
    rng = np.random.default_rng(0)
    return rng.standard_normal((N, D)).astype(dtype) + np.asarray(0.5, dtype)   # (N, D) off-centre: ReMoE routes


@pytest.mark.parametrize("name", LAYERS)
def test_every_layer_is_a_layer(name):
    assert isinstance(LAYERS[name][0](np.float64), Layer)


@pytest.mark.parametrize("name", LAYERS)
def test_backward_before_forward_is_a_value_error(name):
    layer = LAYERS[name][0](np.float64)
    with pytest.raises(ValueError, match=r"backward: call forward first"):
        layer.backward(np.ones((N, D)), aux_scale=2.0)


@pytest.mark.parametrize("name", LAYERS)
def test_backward_takes_aux_scale_and_aux_is_a_float(name):
    layer = LAYERS[name][0](np.float64)
    assert layer.aux == 0.0 and isinstance(layer.aux, float)
    y = layer.forward(inputs(np.float64))
    dy = np.cos(y)
    dx = layer.backward(dy, aux_scale=0.5)
    assert dx.shape == (N, D) and isinstance(layer.aux, float)
    assert set(layer.grads) == set(layer.params)


@pytest.mark.parametrize("name", LAYERS)
def test_routing_stats_name_every_routed_layer(name):
    make, names = LAYERS[name]
    layer = make(np.float64)
    assert layer.routing_stats() == []                       # nothing before a forward
    layer.forward(inputs(np.float64))
    found = layer.routing_stats()
    assert [n for n, _ in found] == names
    for _, stats in found:
        assert isinstance(stats, RoutingStats)
        assert stats.counts.shape == (E,) and stats.logits.shape == (N, E)


@pytest.mark.parametrize("name", LAYERS)
def test_float32_in_float32_out(name):
    layer = LAYERS[name][0](np.float32)
    assert layer.dtype == np.float32
    y = layer.forward(inputs(np.float32))
    dx = layer.backward(np.cos(y), aux_scale=2.0)
    assert y.dtype == dx.dtype == np.float32
    assert all(g.dtype == np.float32 for g in layer.grads.values())
    assert all(s.weights.dtype == s.logits.dtype == np.float32 for _, s in layer.routing_stats())
    with pytest.raises(ValueError, match="dy is float64 but the layer is float32"):
        layer.backward(np.cos(y).astype(np.float64))


@pytest.mark.parametrize("name", LAYERS)
def test_a_numpy_float64_aux_scale_keeps_float32_gradients(name):
    """A loss scaler's scale may arrive as a NumPy float64: it must not upcast a float32 layer."""
    layer = LAYERS[name][0](np.float32)
    y = layer.forward(inputs(np.float32))
    layer.backward(np.cos(y), aux_scale=np.float64(1024.0))
    assert all(g.dtype == np.float32 for g in layer.grads.values()), \
        {k: g.dtype for k, g in layer.grads.items()}
    with pytest.raises(ValueError, match="aux_scale must be a finite number, got inf"):
        layer.backward(np.cos(y), aux_scale=np.inf)


def test_containers_sum_their_childrens_aux():
    """Breaks if a container forgets a child (or the base class drops its own _aux)."""
    for name in ("Sequential", "ResidualNet"):
        net = LAYERS[name][0](np.float64)
        net.forward(inputs(np.float64))
        parts = [c.aux for c in net.children().values()]
        assert sum(a > 0 for a in parts) == 2, name
        assert net.aux == pytest.approx(sum(parts), rel=1e-15)


def test_containers_pass_aux_scale_to_every_child():
    """Sequential.backward(dy, aux_scale): the router gradient moves linearly in aux_scale."""
    net = LAYERS["Sequential"][0](np.float64)
    y = net.forward(inputs(np.float64))
    dy = np.sin(y)
    grads = {}
    for scale in (0.0, 1.0, 3.0):
        net.backward(dy, aux_scale=scale)
        grads[scale] = {k: net.grads[k].copy() for k in ("1.w_router", "2.w_router")}
    for key in grads[0.0]:
        aux_part = grads[1.0][key] - grads[0.0][key]
        assert np.abs(aux_part).max() > 1e-6, key
        assert np.allclose(grads[3.0][key] - grads[0.0][key], 3 * aux_part, rtol=1e-9, atol=1e-13)


def test_a_container_checks_dy_against_its_output():
    net = LAYERS["Sequential"][0](np.float64)
    net.forward(inputs(np.float64))
    with pytest.raises(ValueError, match=r"Sequential.backward: dy must have shape \(12, 6\)"):
        net.backward(np.ones((N - 1, D)))


def test_dense_moe_parts_before_a_forward_is_a_value_error():
    layer = LAYERS["DenseMoE"][0](np.float64)
    with pytest.raises(ValueError, match="call forward first"):
        layer.parts()
    with pytest.raises(ValueError, match="call forward first"):
        layer.backward_parts(np.ones((N, E)), np.ones((E, N, D)))


# -- contradictions fail at construction ---------------------------------------------------

@pytest.mark.parametrize("compute", ["fp16", "bf16", "fp8_e4m3"])
def test_low_precision_on_a_float64_layer_fails_in_the_constructor(compute):
    config = sparse_config(precision=PrecisionConfig(compute=compute))
    with pytest.raises(ValueError, match=f"SparseMoE: config.precision.compute='{compute}'.*dtype=float64"):
        SparseMoE(config, dtype=np.float64)
    SparseMoE(config, dtype=np.float32)                      # the honest combination builds


CONTRADICTIONS = [
    (lambda: Sequential(Linear(D, D, dtype=np.float32), Linear(D, D)),
     "Sequential: part 1 .Linear. is float64 but the container is float32"),
    (lambda: ResidualNet(D, D, 3, [FFN(D, H, dtype=np.float32)]),
     "ResidualNet: part block0 .FFN. is float32 but the container is float64"),
    (lambda: Sequential(Linear(D, D), object()), "Sequential: part 1 must be a Layer, got object"),
    (lambda: Linear(D, D, dtype=np.int32), "Linear: dtype must be a floating-point dtype, got int32"),
    (lambda: SparseMoE(sparse_config(), dtype="float"), None),
    (lambda: DenseMoE(DenseConfig(d_model=D, num_experts=E, d_hidden=H), seed=-1),
     "DenseMoE: seed must be an integer >= 0, got -1"),
    (lambda: SoftMoE(SoftMoEConfig(d_model=D, num_experts=E, d_hidden=H), seed=0.5),
     "SoftMoE: seed must be an integer >= 0, got 0.5"),
    (lambda: FFN(D, 0), "FFN: d_hidden must be an integer >= 1, got 0"),
    (lambda: ResidualNet(3, D, 2, [FFN(D, H), SparseMoE(sparse_config(d_model=D + 1))]),
     "ResidualNet: block1 .SparseMoE. has width d_model=7 but the net's d_model is 6"),
    (lambda: ResidualNet(3, D + 1, 2, [FFN(D, H)]),
     "ResidualNet: block0 .FFN. has width d_model=6 but the net's d_model is 7"),
]


@pytest.mark.parametrize("make, message", CONTRADICTIONS)
def test_contradictions_fail_in_the_constructor(make, message):
    if message is None:                                      # "float" is float64: it builds
        assert make().dtype == np.float64
        return
    with pytest.raises(ValueError, match=message):
        make()


def test_seed_and_dtype_are_keywords_everywhere():
    """Linear(4, 4) builds like every layer; a positional dtype is refused, not read as a seed."""
    assert Linear(4, 4).dtype == np.float64
    for make in (lambda: Linear(4, 4, np.float32), lambda: MLP(4, 5, 4, 0),
                 lambda: SparseMoE(sparse_config(), 0), lambda: FFN(D, H, "mlp", 0)):
        with pytest.raises(TypeError):
            make()
