"""The runs the tests, the chapter and the CLI share: one expert-parallel step (or a few
training steps) against one-process SparseMoE on the same global batch.

    python -m moe_np.parallel.cases CASES_JSON      (under mpiexec) one JSON line per case

Every rank builds the same global batch from the seed, runs its own shard
through ExpertParallelMoE, and also runs the whole batch through SparseMoE
(cheap at these sizes), so each rank can compare what it holds. Rank 0
prints the verdicts.
"""
from __future__ import annotations

import dataclasses
import json
import sys

import numpy as np

from moe_np import gradcheck
from moe_np.config import PrecisionConfig, SparseConfig
from moe_np.optim import SGD
from moe_np.parallel import costs
from moe_np.parallel.layer import ExpertParallelMoE, one_process_twin
from moe_np.sparse import SparseMoE


def global_batch(config: SparseConfig, num_tokens: int, seed: int, dtype, mask_fraction=0.0):
    """x (Z, D), an upstream gradient dy (Z, D) and a mask (Z,) bool (None when no padding)."""
    rng = np.random.default_rng(seed + 1000)
    x = rng.standard_normal((num_tokens, config.d_model)).astype(dtype)    # (Z, D)
    dy = rng.standard_normal((num_tokens, config.d_model)).astype(dtype)   # (Z, D)
    mask = None
    if mask_fraction:
        mask = rng.random(num_tokens) >= mask_fraction                     # (Z,)
    return x, dy, mask


def _same(a, b) -> bool:
    """Bit for bit (NaNs in the same places count as equal)."""
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def _max_diff(a, b) -> float:
    if np.shape(a) != np.shape(b):
        return float("inf")
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)), initial=0.0))


def compare_step(comm, config: SparseConfig, *, tokens_per_rank: int = 8, seed: int = 0,
                 dtype=np.float64, mask_fraction: float = 0.0, aux_scale: float = 0.7,
                 sizes=None, training: bool = True, selection_bias=None, **layer_options) -> dict:
    """One forward and backward on Q ranks against one process; every array compared bit for
    bit. sizes: tokens of each rank (default tokens_per_rank everywhere); selection_bias (E,)
    set on both layers (sigmoid_bias) steers tokens to chosen ranks."""
    world, rank = comm.Get_size(), comm.Get_rank()
    sizes = [tokens_per_rank] * world if sizes is None else list(sizes)
    lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
    x, dy, mask = global_batch(config, sum(sizes), seed, dtype, mask_fraction)
    ep = ExpertParallelMoE(config, comm, seed=seed, dtype=dtype, **layer_options).train(training)
    twin = one_process_twin(config, ep.groups.dp, tokens_per_rank * ep.groups.ep)
    one = SparseMoE(twin, seed=seed, dtype=dtype).train(training)
    if selection_bias is not None:
        for layer in (one, ep):
            layer.buffers["selection_bias"][...] = selection_bias
    y_one = one.forward(x, mask)
    dx_one = one.backward(dy, aux_scale)
    y = ep.forward(x[lo:hi], None if mask is None else mask[lo:hi])
    dx = ep.backward(dy[lo:hi], aux_scale)
    y_all, dx_all = np.concatenate(comm.allgather(y)), np.concatenate(comm.allgather(dx))
    grads = ep.gather_grads()
    verdict = {"y": _same(y_all, y_one), "dx": _same(dx_all, dx_one),
               "aux": ep.aux == one.aux and np.asarray(ep.aux).dtype == np.asarray(one.aux).dtype,
               "counts": _same(ep.stats.counts, one.stats.counts),
               "dropped": ep.stats.num_dropped == one.stats.num_dropped}
    verdict |= {f"grad {k}": _same(grads[k], one.grads[k]) for k in sorted(one.grads)}
    worst = max([_max_diff(y_all, y_one), _max_diff(dx_all, dx_one)]
                + [_max_diff(grads[k], one.grads[k]) for k in one.grads])
    agreed = comm.allgather(all(verdict.values()))
    return {"identical": all(agreed), "checks": verdict, "max_abs_diff": worst,
            "dropped": int(one.stats.num_dropped), "rows_received": _rows_received(comm, ep),
            "bytes": ep.traffic.remote(), "bytes_by_kind": _bytes_by_kind(ep)}


def compare_training(comm, config: SparseConfig, *, steps: int = 3, tokens_per_rank: int = 8,
                     seed: int = 0, dtype=np.float64, lr: float = 0.1, reference=None,
                     **layer_options) -> dict:
    """A few SGD steps on a regression target, on dp * ep ranks (each its own shard) and in
    one process on the whole batch; then every parameter and buffer compared bit for bit.
    reference: SparseConfig fields that differ in the one-process twin (its capacity mode)."""
    world, rank = comm.Get_size(), comm.Get_rank()
    ep = ExpertParallelMoE(config, comm, seed=seed, dtype=dtype, **layer_options)
    twin = one_process_twin(config, ep.groups.dp, tokens_per_rank * ep.groups.ep)
    one = SparseMoE(twin if reference is None else dataclasses.replace(config, **reference),
                    seed=seed, dtype=dtype)
    opt_one, opt_ep = SGD(one.params, lr=lr), SGD(ep.params, lr=lr)
    rows = slice(rank * tokens_per_rank, (rank + 1) * tokens_per_rank)
    for step in range(steps):
        x, target, _ = global_batch(config, world * tokens_per_rank, seed + 7 * step, dtype)
        for layer, opt, xs, ts in ((one, opt_one, x, target), (ep, opt_ep, x[rows], target[rows])):
            y = layer.forward(xs)
            layer.backward(((y - ts) / len(x)).astype(dtype))          # d/dy of 0.5 |y - t|^2 / Z
            opt.step(layer.grads)
    params = ep.gather_params()
    verdict = {f"param {k}": _same(params[k], one.params[k]) for k in sorted(one.params)}
    verdict |= {f"buffer {k}": _same(ep.buffers[k], one.buffers[k]) for k in sorted(one.buffers)}
    worst = max(_max_diff(params[k], one.params[k]) for k in one.params)
    agreed = comm.allgather(all(verdict.values()))
    return {"identical": all(agreed), "checks": verdict, "max_abs_diff": worst,
            "bytes": ep.traffic.remote()}


def traffic_step(comm, config: SparseConfig, *, tokens_per_rank: int = 16, seed: int = 0,
                 dtype=np.float64, ranks_per_node: int = 2, **layer_options) -> dict:
    """One forward and backward; the bytes of rows each rank sent, measured by the ledger and
    predicted from one process's plan (who holds which kept assignment); rows within and
    across nodes; the most nodes any token's experts span."""
    world, rank = comm.Get_size(), comm.Get_rank()
    x, dy, _ = global_batch(config, world * tokens_per_rank, seed, dtype)
    one = SparseMoE(config, seed=seed, dtype=dtype)
    one.forward(x)
    ep = ExpertParallelMoE(config, comm, seed=seed, dtype=dtype, ranks_per_node=ranks_per_node,
                           **layer_options)
    rows = slice(rank * tokens_per_rank, (rank + 1) * tokens_per_rank)
    ep.backward(dy[rows] + 0 * ep.forward(x[rows]))
    home = np.repeat(np.arange(world), tokens_per_rank)                  # (Z,) home rank
    kept = one._cache.plan.token_rows >= 0                               # (Z, K) kept
    per_rank = config.num_experts // ep.groups.ep
    matrix = costs.rows_matrix(home, one.stats.ids, kept, per_rank, world)   # (Q, Q)
    row_bytes = config.d_model * np.dtype(dtype).itemsize
    off = matrix - np.diag(np.diag(matrix))                              # (Q, Q) remote rows
    predicted = 2 * (off[rank].sum() + off[:, rank].sum()) * row_bytes   # forward + backward
    nodes = costs.node_traffic(home, one.stats.ids, kept, per_rank, ranks_per_node)
    return {"identical": comm.allgather(ep.traffic.remote("rows") == predicted) == [True] * world,
            "measured": comm.allgather(ep.traffic.remote("rows")),
            "predicted": comm.allgather(int(predicted)), "matrix": matrix.tolist(),
            "within": nodes.within, "across": nodes.across, "deduplicated": nodes.deduplicated,
            "max_nodes": nodes.max_nodes, "imbalance": costs.imbalance(matrix.sum(axis=0)),
            "bytes_by_kind": _bytes_by_kind(ep)}


def gradcheck_step(comm, config: SparseConfig, *, tokens_per_rank: int = 3, seed: int = 0,
                   dtype=np.float64, wrt=("x", "w_router", "b2"), **layer_options) -> dict:
    """Central differences on the distributed layer itself (gradcheck.check_pair, float64):
    the output is every rank's y gathered, with the aux loss appended; inputs x (all Z tokens)
    and every parameter, perturbed alike on every rank, so each evaluation is one collective
    forward on all of them, so only the inputs in `wrt` are checked (x: through both
    exchanges; w_router: the gathered replicated gradient; an expert's b2: on its owner).
    Routing choices are guarded (a +-h step must not change them)."""
    world, rank = comm.Get_size(), comm.Get_rank()
    rows = slice(rank * tokens_per_rank, (rank + 1) * tokens_per_rank)
    layer = ExpertParallelMoE(config, comm, seed=seed, **layer_options).eval()
    x0, _, _ = global_batch(config, world * tokens_per_rank, seed, np.float64)

    def forward(x, **params):
        layer.load_params(params)
        y = layer.forward(np.ascontiguousarray(x[rows]))
        return np.append(np.concatenate(comm.allgather(y)).ravel(), layer.aux), None

    def backward(dout, _):
        dy = dout[:-1].reshape(len(x0), -1)[rows]                      # this rank's rows
        dx = np.concatenate(comm.allgather(layer.backward(np.ascontiguousarray(dy), dout[-1])))
        return {"x": dx} | layer.gather_grads()

    def selection(x, **params):
        forward(x, **params)
        return tuple(comm.allgather(layer.stats.ids))

    inputs = {"x": x0} | layer.gather_params()
    results = gradcheck.check_pair("ExpertParallelMoE", forward, backward, inputs, wrt=list(wrt),
                                   seed=seed, selection=selection)
    verdict = {f"wrt {r.wrt}": bool(r.passed) for r in results}
    return {"identical": all(verdict.values()), "checks": verdict,
            "max_abs_diff": max(r.abs_error for r in results)}


def _bytes_by_kind(layer) -> dict:
    """Bytes this rank sent to other ranks, by kind (counts, meta, rows, aux, grads)."""
    return {k: layer.traffic.remote(k) for k in layer.traffic.sent}


def _rows_received(comm, layer) -> list:
    """Rows each rank's experts received in the last forward (rank order)."""
    return comm.allgather(int(layer._cache.plan.recv_rows.sum()))


def run_cases(comm, cases: list) -> list:
    """Each case: {"name", "config": {SparseConfig fields}, other compare_step options}."""
    results = []
    for case in cases:
        case = dict(case)
        name = case.pop("name")
        fields = case.pop("config")
        if isinstance(fields.get("precision"), dict):
            fields = fields | {"precision": PrecisionConfig(**fields["precision"])}
        config = SparseConfig(**fields)
        dtype = np.dtype(case.pop("dtype", "float64"))
        run = {"step": compare_step, "training": compare_training,
               "traffic": traffic_step, "gradcheck": gradcheck_step}[case.pop("kind", "step")]
        results.append({"name": name} | run(comm, config, dtype=dtype, **case))
    return results


FAULTS = ("experts", "sizes", "config", "seed", "batch")


def fault(comm, name: str) -> None:
    """Build or run a layer wrongly on purpose (the tests check that every rank ends, with the
    message): experts not divisible by ep; dp * ep != world size; one rank with another k;
    one rank with another seed; one rank given a batch with a NaN."""
    rank, world = comm.Get_rank(), comm.Get_size()
    config = SparseConfig(d_model=6, num_experts=4 * world, d_hidden=5, k=2)
    options = {"seed": 0}
    if name == "experts":
        config = dataclasses.replace(config, num_experts=4 * world + 1)
    elif name == "sizes":
        options |= {"ep": world, "dp": 2}
    elif name == "config" and rank == world - 1:
        config = dataclasses.replace(config, k=3)
    elif name == "seed" and rank == world - 1:
        options["seed"] = 1
    layer = ExpertParallelMoE(config, comm, **options)
    x, _, _ = global_batch(config, 4, rank, np.float64)
    if name == "batch" and rank == world - 1:
        x[2, 3] = np.nan
    layer.forward(x)
    print(f"rank {rank}: no error", flush=True)


def main(argv=None) -> int:
    from moe_np.parallel.launch import stop_everyone_on_error, world
    argv = sys.argv[1:] if argv is None else argv
    comm = world()
    with stop_everyone_on_error(comm):
        if argv[0] == "--fault":
            fault(comm, argv[1])
            return 0
        cases = json.loads(open(argv[0]).read() if not argv[0].startswith("[") else argv[0])
        for result in run_cases(comm, cases):
            if comm.Get_rank() == 0:
                print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
