"""Expert parallelism over MPI (chapter 10): the routed experts spread over ranks, tokens
moved to them and back with all-to-all exchanges, bit-identical to one process.

    plan.py      the expert-parallel plan: layout, claims, arrival order, capacity at the owner
    exchange.py  Alltoall / Alltoallv / Allgatherv / Allreduce on NumPy buffers, a byte ledger
    alltoall.py  the forward and backward exchanges of a layer (a pure pair)
    groups.py    world, expert-parallel and data-parallel groups, nodes, the agreement check
    layer.py     ExpertParallelMoE
    costs.py     bytes and imbalance of a plan, the alpha-beta fit, the paper model at scale
    launch.py    mpi4py and mpiexec: availability, launching a script, stopping every rank
    cases.py     the equivalence and training runs the tests, the chapter and the CLI share
    cli.py       `python -m moe_np parallel`

Only launch.py imports mpi4py (and only when asked to): the rest takes a
communicator as an argument, so importing this package needs no MPI.
"""
from moe_np.parallel.layer import (ExpertParallelMoE, node_limited, one_process_twin,  # noqa: F401
                                   per_rank_capacity)
