"""Chapter 7's optimizer step compiled (optim_kernels.adam_update) against its NumPy twin
(optim.Adam.update_numpy), bit for bit; which path a step takes; bad input refused."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moe_np import optim_kernels
from moe_np.optim import Adam, AdamW

ROOT = Path(__file__).resolve().parents[1]


def params_and_grads(dtype, seed=0, steps=4):
    rng = np.random.default_rng(seed)
    shapes = {"w": (3, 5), "b": (7,), "e": (2, 3, 4)}
    params = {k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()}
    grads = [{k: (rng.standard_normal(s) * 10.0 ** rng.uniform(-8, 2, s)).astype(dtype)
              for k, s in shapes.items()} for _ in range(steps)]
    for g in grads:
        g["b"][0] = 0.0                                             # a zero gradient: v stays put
    return params, grads


def twin_step(opt, grads) -> None:
    """opt.step with every parameter through the NumPy twin."""
    opt._check(grads)
    opt.t += 1
    for name, p in opt.params.items():
        opt.update_numpy(p, grads[name], opt.state["m"][name], opt.state["v"][name])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adam_kernel_is_its_numpy_twin(dtype, weight_decay):
    """Several steps (bias corrections change), gradients over ten decades, a zero one: the
    parameters and both moments agree bit for bit."""
    runs = []
    for stepper in ("kernel", "twin"):
        params, grads = params_and_grads(dtype)
        opt = Adam(params, lr=3e-3, betas=(0.8, 0.95), eps=1e-7, weight_decay=weight_decay)
        for g in grads:
            opt.step(g) if stepper == "kernel" else twin_step(opt, g)
        runs.append([params, opt.state["m"], opt.state["v"]])
    for got, want in zip(*runs):
        for k in got:
            assert got[k].dtype == dtype and np.array_equal(got[k], want[k]), k


def test_step_takes_the_kernel_only_where_it_gives_numpys_bits(monkeypatch):
    """Contiguous float32 arrays with Python-float hyperparameters go through the kernel; a
    float16 parameter, a strided gradient and a NumPy-scalar learning rate (NumPy then
    computes in float64) go through the twin, and still update."""
    calls = []
    kernel = optim_kernels.adam_rows
    monkeypatch.setattr(optim_kernels, "adam_rows", lambda *a: calls.append(a[0].dtype) or kernel(*a))
    params, grads = params_and_grads(np.float32, steps=1)
    opt = AdamW(params, lr=1e-3)
    opt.step(grads[0])
    assert len(calls) == 3
    for odd_params, odd_grads, lr in [({"h": np.ones(4, np.float16)}, {"h": np.ones(4, np.float16)}, 1e-3),
                                      ({"s": np.ones(4, np.float32)}, {"s": np.ones(8, np.float32)[::2]}, 1e-3),
                                      ({"n": np.ones(4, np.float32)}, {"n": np.ones(4, np.float32)}, np.float64(1e-3))]:
        calls.clear()
        before = {k: v.copy() for k, v in odd_params.items()}
        AdamW(odd_params, lr=lr).step(odd_grads)
        assert calls == [] and all(np.all(odd_params[k] < before[k]) for k in before)


def test_aliased_moments_take_the_twin_and_keep_its_bits(monkeypatch):
    """A gradient that is a moment's own array: NumPy's passes see their own writes, so the
    step goes through the twin (a gradient that is the parameter itself gives the same bits
    either way, and takes the kernel)."""
    calls = []
    kernel = optim_kernels.adam_rows
    monkeypatch.setattr(optim_kernels, "adam_rows", lambda *a: calls.append(1) or kernel(*a))
    for alias in ("m", "v"):
        runs = []
        for stepper in ("step", "twin"):
            params = {"w": np.linspace(-1, 1, 6, dtype=np.float32)}
            opt = AdamW(params, lr=0.1)
            opt.state["m"]["w"][...] = 0.5
            opt.state["v"]["w"][...] = 0.25
            grads = {"w": opt.state[alias]["w"]}
            opt.step(grads) if stepper == "step" else twin_step(opt, grads)
            runs.append(params["w"].copy())
        assert np.array_equal(*runs) and calls == []
    params = {"w": np.linspace(-1, 1, 6, dtype=np.float32)}
    AdamW(params, lr=0.1).step({"w": params["w"]})
    assert calls == [1]


def test_bad_arrays_are_refused():
    p = np.ones(4, np.float32)
    hyper = optim_kernels.AdamHyper(0.9, 0.999, 1e-3, 1e-8, 0.0, 1)
    for args, match in [((p, np.ones(5, np.float32), p.copy(), p.copy()), "adam_update: p, g, m, v"),
                        ((p, p.copy(), p.astype(np.float64), p.copy()), "adam_update"),
                        ((p, p.copy(), p.copy(), np.ones(8, np.float32)[::2]), "adam_update")]:
        with pytest.raises(ValueError, match=match):
            optim_kernels.adam_update(*args, hyper)
    with pytest.raises(ValueError, match="hyperparameters Python numbers"):
        optim_kernels.adam_update(p, p.copy(), p.copy(), p.copy(), hyper._replace(lr=np.float32(1e-3)))
    assert not optim_kernels.adam_update(p, p, p, p.copy(), hyper, strict=False)   # g is m
    assert np.all(p == 1)                                           # nothing written


def test_kernel_runs_as_plain_python():
    """The loop itself, called directly (Adam.step takes the twin when the JIT is disabled)."""
    code = ("import numpy as np\nfrom moe_np import compiled, optim_kernels\nfrom moe_np.optim import Adam\n"
            "assert compiled.load('optim_kernels') is None\n"
            "q = {'w': np.linspace(-1, 1, 6, dtype=np.float32)}; p = q['w'].copy()\n"
            "m, v = np.full(6, 0.5, np.float32), np.full(6, 0.25, np.float32)\n"
            "b = Adam(q, lr=0.1, weight_decay=0.1); b.state['m']['w'][...] = m; b.state['v']['w'][...] = v\n"
            "g = np.arange(6, dtype=np.float32) - 2\n"
            "assert optim_kernels.adam_update(p, g, m, v, optim_kernels.AdamHyper(0.9, 0.999, 0.1, 1e-8, 0.1, 1))\n"
            "b.step({'w': g})\n"
            "assert np.array_equal(p, q['w']) and np.array_equal(v, b.state['v']['w']); print('plain python ok')\n")
    env = dict(os.environ, NUMBA_DISABLE_JIT="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "plain python ok" in done.stdout, done.stderr[-2000:]
