"""`python -m moe_np demo`: the gradient-check summary, then two small training runs."""
from __future__ import annotations

import numpy as np

from moe_np import SparseConfig, SparseMoE, data, losses
from moe_np.checks import run_checks
from moe_np.models import MLP
from moe_np.optim import SGD, Adam
from moe_np.train import accuracy, fit


def summarise_checks() -> bool:
    rows = run_checks()
    failed = [r for r in rows if not r.passed]
    worst = max(rows, key=lambda r: r.rel_error)
    print(f"gradient checks: {len(rows)} run, {len(failed)} failing; "
          f"worst rel_error {worst.rel_error:.1e} ({worst.name} wrt {worst.wrt})")
    for r in failed:
        print(f"  FAIL {r.name} wrt {r.wrt}: {r.rel_error:.2e}")
    return not failed


def train_two_layer(steps: int) -> None:
    print("\ntwo-layer network 10 -> 100 -> 10 (ReLU), SGD, on 10 Gaussian blobs")
    x, y = data.make_blobs(2000, dim=10, classes=10, seed=0)         # (2000, 10), (2000,)
    (x_tr, y_tr), (x_te, y_te) = data.split(x, y)
    net = MLP(10, 100, 10, seed=0)
    fit(net, x_tr, y_tr, losses.cross_entropy_forward, losses.cross_entropy_backward,
        SGD(net.params, lr=0.1), steps=steps, batch_size=64, log_every=max(1, steps // 5))
    print(f"test accuracy {accuracy(net.forward(x_te), y_te):.3f} "
          f"(chance {1 / 10:.3f})")


def train_sparse_moe(steps: int) -> None:
    print("\nsparse MoE: 8 ReLU experts, top-2 of a softmax router, capacity factor 1.25, "
          "balance loss 0.01, on the four-quadrant regression task of chapter 3")
    x, y, _ = data.make_regions(4000, seed=0)                        # (4000, 2) each
    (x_tr, y_tr), (x_te, y_te) = data.split(x, y)
    config = SparseConfig(d_model=2, num_experts=8, d_hidden=8, router="softmax_topk", k=2,
                          capacity_factor=1.25, balance_coef=0.01)
    layer = SparseMoE(config, seed=0)
    fit(layer, x_tr, y_tr, losses.mse_forward, losses.mse_backward, Adam(layer.params, 1e-2),
        steps=steps, batch_size=128, log_every=max(1, steps // 5))
    layer.eval()
    test_mse = losses.mse_forward(layer.forward(x_te), y_te)[0]
    stats = layer.stats
    share = stats.counts / stats.ids.size
    print(f"test MSE {test_mse:.4f}; kept share per expert on the test set {np.round(share, 3)} "
          f"(ideal 1/E = {1 / 8:.3f}); assignments dropped {stats.num_dropped} of {stats.ids.size}")


def run_demo(quick: bool = False) -> int:
    np.set_printoptions(precision=4, suppress=True)
    ok = summarise_checks()
    train_two_layer(steps=100 if quick else 1000)
    train_sparse_moe(steps=100 if quick else 1000)
    return 0 if ok else 1
