"""`mpiexec -n 4 python -m moe_np parallel [--dp D --ep P] [--router R] [--steps N] ...`

Checks that the ranks compute what one process computes (bit for bit), trains a
few steps both ways and compares the parameters, then prints the bytes each
rank moved, the load imbalance and a fitted alpha-beta model of the
all-to-all. Started without mpiexec (one rank, or no mpi4py) it says how to
start it.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

START = "mpiexec -n 4 python -m moe_np parallel [--dp D --ep P] [--router R] [--steps N]"


def _at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}")
        return value
    return parse


def configure(p) -> None:
    from moe_np.config import ROUTER_KINDS
    p.add_argument("--dp", type=_at_least(1), default=None, help="data-parallel replicas (default: world / ep)")
    p.add_argument("--ep", type=_at_least(1), default=None, help="ranks per expert-parallel group "
                   "(default: the whole world)")
    p.add_argument("--router", choices=[r for r in ROUTER_KINDS if r != "expert_choice"],
                   default="softmax_topk", help="how tokens choose experts (chapter 4)")
    p.add_argument("--experts", type=_at_least(1), default=None, help="E (default: 4 per expert-parallel rank)")
    p.add_argument("--k", type=_at_least(1), default=2, help="experts per token")
    p.add_argument("--capacity-factor", type=float, default=1.25, help="0 for dropless")
    p.add_argument("--d-model", type=_at_least(1), default=16, help="D")
    p.add_argument("--tokens-per-rank", type=_at_least(2), default=32, help="each rank's shard of the batch")
    p.add_argument("--steps", type=_at_least(0), default=3, help="training steps compared with one process")
    p.add_argument("--ranks-per-node", type=_at_least(1), default=None, help="ranks counted as one node")
    p.add_argument("--seed", type=_at_least(0), default=0)
    p.add_argument("--dtype", choices=("float64", "float32"), default="float64")


def run(args) -> int:
    from moe_np.parallel.launch import INSTALL, mpi_available, stop_everyone_on_error, world
    if not mpi_available():
        print(f"error: parallel needs mpi4py and mpiexec: {INSTALL}; then start it with: {START}",
              file=sys.stderr)
        return 2
    comm = world()
    if comm.Get_size() < 2:
        print(f"error: parallel runs on several MPI ranks; start it with: {START}", file=sys.stderr)
        return 2
    with stop_everyone_on_error(comm):
        report(comm, args)
    return 0


def _config(args, ep: int):
    from moe_np.config import SparseConfig
    experts = args.experts or 4 * ep
    k = 1 if args.router == "switch" else args.k
    return SparseConfig(d_model=args.d_model, num_experts=experts, d_hidden=2 * args.d_model,
                        router=args.router, k=k, capacity_factor=args.capacity_factor or None,
                        balance_coef=0.01 if args.router in ("softmax_topk", "switch") else 0.0)


def report(comm, args) -> None:
    from moe_np.parallel import cases, costs
    from moe_np.parallel.layer import _sizes, one_process_twin
    world = comm.Get_size()
    ep, dp = _sizes(world, args.ep, args.dp)
    config, dtype = _config(args, max(ep, 1)), np.dtype(args.dtype)
    options = {"ep": ep, "dp": dp, "ranks_per_node": args.ranks_per_node}
    say = print if comm.Get_rank() == 0 else (lambda *a, **k: None)
    say(f"{world} ranks = dp {dp} x ep {ep}; E = {config.num_experts} experts "
        f"({config.num_experts // max(ep, 1)} per rank), K = {config.k}, router {config.router}, "
        f"capacity factor {config.capacity_factor}, {args.tokens_per_rank} tokens per rank, {dtype}")
    twin = one_process_twin(config, dp, ep * args.tokens_per_rank)
    if twin != config:
        say(f"capacity is counted within each expert-parallel group of {ep * args.tokens_per_rank} "
            f"tokens: the one-process twin counts it per sequence of that many tokens")
    step = cases.compare_step(comm, config, tokens_per_rank=args.tokens_per_rank, seed=args.seed,
                              dtype=dtype, **options)
    same = "bit-identical" if step["identical"] else "DIFFERENT: " + ", ".join(
        k for k, v in step["checks"].items() if not v)
    say(f"one step against one process on the same {world * args.tokens_per_rank} tokens: y, aux, "
        f"dx and {sum(k.startswith('grad') for k in step['checks'])} gradients {same} "
        f"(largest |difference| {step['max_abs_diff']:.1e})")
    train = cases.compare_training(comm, config, steps=args.steps, seed=args.seed, dtype=dtype,
                                   tokens_per_rank=args.tokens_per_rank, **options)
    say(f"{args.steps} SGD steps on {world} ranks and in one process: parameters "
        f"{'bit-identical' if train['identical'] else 'DIFFERENT'} "
        f"(largest |difference| {train['max_abs_diff']:.1e})")
    _traffic(comm, step, say, costs)


def _traffic(comm, step: dict, say, costs) -> None:
    kinds = comm.gather(step["bytes_by_kind"], root=0)
    rows = step["rows_received"]
    if comm.Get_rank() == 0:
        for kind in kinds[0]:
            per_rank = [k[kind] for k in kinds]
            say(f"  bytes sent to other ranks, one forward + backward, {kind:>6}: {per_rank}")
        say(f"rows received per rank (forward) {rows}: imbalance max/mean "
            f"{costs.imbalance(rows):.2f}")
    sizes = np.array([1 << 8, 1 << 12, 1 << 15, 1 << 17, 1 << 19])
    alpha, beta = costs.fit_alpha_beta(sizes, costs.time_alltoall(comm, sizes, repeats=10))
    say(f"all-to-all fitted t = alpha + s / bandwidth over {len(sizes)} sizes s (bytes per pair): "
        f"alpha {alpha * 1e6:.1f} us, bandwidth {1 / beta / 1e9:.2f} GB/s; {comm.Get_size()} ranks "
        f"sharing this machine's cores: the times measure the scheduler as much as MPI, "
        f"the bytes and rows above are exact")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m moe_np.parallel.cli")
    configure(parser)
    sys.exit(run(parser.parse_args()))
