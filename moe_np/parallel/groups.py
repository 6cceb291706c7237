"""Process groups: the world split into expert-parallel and data-parallel groups, nodes,
and the start-up check that every rank was built alike.

A world of dp * ep ranks, rank w = a * ep + j:

    expert-parallel group a   ranks a ep .. a ep + ep - 1   (consecutive: they trade tokens)
    data-parallel group j     ranks j, j + ep, j + 2 ep ... (the replicas of the same experts)

Consecutive ranks_per_node ranks form a node (rank w is on node w // ranks_per_node), the
grouping node-limited routing and the traffic count use.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import NamedTuple

import numpy as np


class AgreedError(ValueError):
    """An error every rank raises alike (the same check on the same shared facts): each rank
    can stop by itself, and only rank 0 needs to print it."""


class Groups(NamedTuple):
    world: object            # the world communicator (dp * ep ranks)
    ep_comm: object          # this rank's expert-parallel group (ep ranks)
    dp_comm: object          # this rank's data-parallel group (dp ranks)
    ep: int
    dp: int
    ep_ranks: np.ndarray     # (ep,) world ranks of the expert-parallel group, in its order
    dp_ranks: np.ndarray     # (dp,) world ranks of the data-parallel group, in its order
    world_ranks: np.ndarray  # (dp*ep,) 0 .. dp*ep - 1
    ranks_per_node: int

    @property
    def ep_rank(self) -> int:
        return self.ep_comm.Get_rank()

    def node_of(self, world_rank):
        """The node of a world rank (or of an array of them)."""
        return np.asarray(world_rank) // self.ranks_per_node


def make_groups(world, ep: int, dp: int, ranks_per_node: int | None = None) -> Groups:
    """Split the world (collective: every rank must call it). Sizes checked beforehand."""
    rank = world.Get_rank()
    a, j = divmod(rank, ep)
    per_node = ep if ranks_per_node is None else ranks_per_node
    if per_node < 1 or ep % per_node:
        raise AgreedError(f"make_groups: ranks_per_node={per_node} must divide ep={ep} "
                          f"(a node holds whole groups of consecutive ranks)")
    ep_comm = world.Split(a, j)
    dp_comm = world.Split(j, a)
    return Groups(world, ep_comm, dp_comm, ep, dp, a * ep + np.arange(ep, dtype=np.int64),
                  j + ep * np.arange(dp, dtype=np.int64), np.arange(dp * ep, dtype=np.int64),
                  per_node)


def describe(config, **extra) -> dict:
    """Every field that must agree across ranks, as printable strings: the config's own
    fields (precision's flattened in) and the extras (seed, dtype, sizes)."""
    fields = {}
    for name, value in dataclasses.asdict(config).items():
        if isinstance(value, dict):
            fields |= {f"{name}.{k}": repr(v) for k, v in value.items()}
        else:
            fields[name] = repr(value)
    return fields | {k: repr(v) for k, v in extra.items()}


def check_agreement(world, owner: str, fields: dict) -> None:
    """Rank 0 broadcasts a hash of its fields; every rank compares; if any differs, all
    ranks gather the fields and raise the same AgreedError naming the first that differs."""
    digest = hashlib.sha256(repr(sorted(fields.items())).encode()).hexdigest()
    root = world.bcast(digest, root=0)
    if world.allreduce(int(root != digest)) == 0:
        return
    everyone = world.allgather(fields)
    for name in sorted(set().union(*everyone)):
        values = [f.get(name, "<missing>") for f in everyone]
        if len(set(values)) > 1:
            odd = next(r for r, v in enumerate(values) if v != values[0])
            raise AgreedError(f"{owner}: ranks were built differently: {name} is {values[0]} "
                              f"on rank 0 but {values[odd]} on rank {odd}")
    raise AgreedError(f"{owner}: ranks were built differently (hashes differ)")
