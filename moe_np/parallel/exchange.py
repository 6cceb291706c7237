"""The collectives of expert parallelism, on contiguous NumPy buffers, with a byte ledger.

    exchange_counts   Alltoall:   counts (Q, E/Q) -> counts (Q, E/Q)   who sends how many rows
    exchange_rows     Alltoallv:  rows (M, ...) -> rows (I, ...)     sizes known to both sides
    gather_rows       Allgatherv: rows (N, ...) -> rows (Z, ...)     every rank's rows, rank order
    sum_everywhere    Allreduce:  a             -> sum over ranks

Every function takes a Wire: the communicator it runs on (an mpi4py Comm),
the world ranks of its members, and the Traffic ledger that records how many
bytes this rank's data had to reach each other rank, by kind ("counts",
"meta", "rows", "aux", "grads"). Those are logical bytes: what must arrive,
not what a particular MPI algorithm puts on the wire (a ring all-gather
forwards other ranks' pieces too). Bytes a rank sends to itself are kept
apart: they never leave the process.

Shape letters: Q ranks of the group (E/Q experts each), M rows this rank
sends, I rows it receives, Z the tokens of all ranks.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

KINDS = ("counts", "meta", "rows", "aux", "grads")


class Traffic:
    """Bytes this rank's data had to reach each rank of its world, by kind.

    sent[kind] is a (world size,) int64 vector indexed by world rank; the
    entry for this rank itself is what stayed local."""

    def __init__(self, world_size: int, world_rank: int):
        self.world_size, self.world_rank = world_size, world_rank
        self.sent = {k: np.zeros(world_size, dtype=np.int64) for k in KINDS}   # (dp*ep,) each
        self.calls = {k: 0 for k in KINDS}

    def add(self, kind: str, per_rank_bytes, ranks) -> None:
        """Add bytes sent to the group ranks `ranks` (their world ranks, in group order)."""
        self.sent[kind][np.asarray(ranks)] += np.asarray(per_rank_bytes, dtype=np.int64)
        self.calls[kind] += 1

    def remote(self, kind: str | None = None) -> int:
        """Bytes that left this process (of one kind, or of all)."""
        kinds = KINDS if kind is None else (kind,)
        return int(sum(self.sent[k].sum() - self.sent[k][self.world_rank] for k in kinds))

    def reset(self) -> None:
        for k in KINDS:
            self.sent[k][:] = 0
            self.calls[k] = 0


class Wire(NamedTuple):
    """A communicator, the world ranks of its members (in its order) and the ledger."""
    comm: object              # an mpi4py communicator
    ranks: np.ndarray         # (Q,) world rank of each member
    traffic: Traffic


def _displacements(counts):
    """Start of each rank's piece in a packed buffer.   (Q,) -> (Q,)."""
    return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)


def exchange_counts(wire: Wire, counts):
    """Alltoall: row p of counts goes to rank p; row q of the result came from rank q.

    counts (Q, E/Q) int64 -> (Q, E/Q) int64. The first message of every exchange:
    after it, each rank knows the size of every message it will receive."""
    counts = np.ascontiguousarray(counts, dtype=np.int64)              # (Q, E/Q)
    received = np.empty_like(counts)                                   # (Q, E/Q)
    wire.comm.Alltoall(counts, received)
    wire.traffic.add("counts", np.full(len(counts), counts[0].nbytes), wire.ranks)
    return received


def exchange_rows(wire: Wire, send, send_rows, recv_rows, kind: str = "rows"):
    """Alltoallv: the first send_rows[0] rows go to rank 0, the next send_rows[1] to rank 1, ...

    send (M, ...) contiguous, send_rows (Q,), recv_rows (Q,) (known from the
    counts exchange) -> received (I, ...), rank 0's rows first."""
    send = np.ascontiguousarray(send)                                  # (M, ...)
    width = int(np.prod(send.shape[1:], dtype=np.int64))               # the width of a row
    if int(np.sum(send_rows)) != len(send):
        raise ValueError(f"exchange_rows: send_rows sum to {int(np.sum(send_rows))} but the "
                         f"buffer has {len(send)} rows")
    received = np.empty((int(np.sum(recv_rows)),) + send.shape[1:], dtype=send.dtype)   # (I, ...)
    s_counts, r_counts = np.asarray(send_rows) * width, np.asarray(recv_rows) * width
    wire.comm.Alltoallv([send, (s_counts, _displacements(s_counts))],
                   [received, (r_counts, _displacements(r_counts))])
    wire.traffic.add(kind, s_counts * send.itemsize, wire.ranks)
    return received


def gather_rows(wire: Wire, rows, kind: str = "aux", sizes=None):
    """Allgatherv: every rank's rows, concatenated in rank order.   (N, ...) -> (Z, ...).
    sizes (Q,): each rank's row count, if known (else one more small all-gather finds it)."""
    rows = np.ascontiguousarray(rows)                                  # (N, ...)
    if sizes is None:
        sizes = wire.comm.allgather(len(rows))
    sizes = np.asarray(sizes, dtype=np.int64)                          # (Q,)
    width = int(np.prod(rows.shape[1:], dtype=np.int64))               # the width of a row
    out = np.empty((int(sizes.sum()),) + rows.shape[1:], dtype=rows.dtype)   # (Z, ...)
    counts = sizes * width
    wire.comm.Allgatherv(rows, [out, (counts, _displacements(counts))])
    wire.traffic.add(kind, np.full(len(sizes), rows.nbytes), wire.ranks)
    return out


def sum_everywhere(wire: Wire, a, kind: str = "grads"):
    """Allreduce with MPI_SUM: the same sum on every rank (MPI chooses the order of the sum).
    a: any array -> its sum over the ranks, same shape and dtype."""
    a = np.ascontiguousarray(a)
    out = np.empty_like(a)
    wire.comm.Allreduce(a, out)
    wire.traffic.add(kind, np.full(len(wire.ranks), a.nbytes), wire.ranks)
    return out


def gather_columns(wire: Wire, pieces: dict, kind: str = "aux", sizes=None) -> dict:
    """Several per-token arrays gathered in one Allgatherv: packed side by side as columns of
    one float64 (or, when every piece is float32, float32) array, then split and cast back.
    Integers below 2**53 and float32 values survive float64 exactly.
    pieces {name: (N,) or (N, f)} -> {name: (Z,) or (Z, f)}, each in its own dtype."""
    if not pieces:
        return {}
    columns = {k: np.asarray(v).reshape(len(v), int(np.prod(np.shape(v)[1:], dtype=np.int64)))
               for k, v in pieces.items()}                             # (N, f) each
    dtype = np.float32 if all(v.dtype == np.float32 for v in columns.values()) else np.float64
    packed = np.concatenate([v.astype(dtype) for v in columns.values()], axis=1)   # (N, sum f)
    everyone = gather_rows(wire, packed, kind, sizes)                  # (Z, sum f)
    out, start = {}, 0
    for k, v in columns.items():
        block = everyone[:, start:start + v.shape[1]].astype(v.dtype)  # (Z, f)
        out[k] = block.reshape((len(everyone),) + np.shape(pieces[k])[1:])
        start += v.shape[1]
    return out
