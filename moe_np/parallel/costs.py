"""What expert parallelism costs: exact counts from a plan, a fitted alpha-beta model of the
all-to-all, and a paper model of a DeepSeek-V3-sized layer.

    rows_matrix        kept assignments -> (Q, Q) rows rank q sends to rank p
    node_traffic       rows within a node, across nodes, and the (token, node) pairs a
                       deduplicating dispatcher would send across
    imbalance          max / mean of the rows each rank's experts receive
    time_alltoall      measured Alltoall times over message sizes (MPI_Wtime, max over ranks)
    fit_alpha_beta     t(s) = alpha + beta s by least squares
    layer_model        a DeepSeek-V3-sized layer on paper: bytes, link times, expert compute

Counts and bytes are exact; a timing of more ranks than cores measures the
operating system's scheduler as much as MPI, and is reported beside the counts,
never instead of them. Shape letters: Z tokens (of all ranks), K choices, E experts, Q ranks.
"""
from __future__ import annotations

import time
from typing import NamedTuple

import numpy as np

from moe_np.routers import group_limited_mask, top_k_indices


def rows_matrix(token_rank, expert_ids, kept, experts_per_rank: int, ranks: int):
    """rows[q, p] = kept assignments of rank q's tokens to rank p's experts.
    token_rank (Z,) home rank of each token, expert_ids (Z, K), kept (Z, K) bool -> (Q, Q)."""
    src = np.broadcast_to(token_rank[:, None], expert_ids.shape)[kept]    # (M,)
    dst = expert_ids[kept] // experts_per_rank                             # (M,)
    return np.bincount(src * ranks + dst, minlength=ranks * ranks).reshape(ranks, ranks)


def imbalance(rows_received) -> float:
    """max over mean of the rows each rank receives: the straggler sets the step's pace."""
    rows = np.asarray(rows_received, dtype=np.float64)
    return float(rows.max() / rows.mean()) if rows.mean() > 0 else 1.0


class NodeTraffic(NamedTuple):
    within: int        # rows sent to another rank of the same node
    across: int        # rows sent to a rank of another node
    deduplicated: int  # distinct (token, other node) pairs: what crosses if each token goes
                       # to a node once and is forwarded inside it (DeepEP's scheme)
    max_nodes: int     # the most nodes any one token's kept experts span


def node_traffic(token_rank, expert_ids, kept, experts_per_rank: int, ranks_per_node: int):
    """Rows within and across nodes for kept assignments (Z, K) of tokens homed on token_rank."""
    home_node = token_rank // ranks_per_node                               # (Z,)
    dst_rank = expert_ids // experts_per_rank                              # (Z, K)
    dst_node = dst_rank // ranks_per_node                                  # (Z, K)
    remote = kept & (dst_rank != token_rank[:, None])                      # (Z, K) off this rank
    across = remote & (dst_node != home_node[:, None])                     # (Z, K)
    t_idx, k_idx = np.nonzero(across)                                      # (X,) each
    num_nodes = int(max(dst_node.max(initial=0), home_node.max(initial=0))) + 1
    pairs = np.unique(t_idx * num_nodes + dst_node[t_idx, k_idx]).size     # distinct (token, node)
    return NodeTraffic(int((remote & ~across).sum()), int(across.sum()), int(pairs),
                       int(nodes_spanned(np.where(kept, dst_node, -1)).max(initial=0)))


def nodes_spanned(nodes):
    """How many distinct nodes each row names (entries < 0 are ignored).   (Z, K) -> (Z,)."""
    s = np.sort(nodes, axis=1)                                             # (Z, K)
    new = np.ones_like(s, dtype=bool)                                      # (Z, K)
    new[:, 1:] = s[:, 1:] != s[:, :-1]
    return ((s >= 0) & new).sum(axis=1)                                    # (Z,)


def time_alltoall(comm, sizes_bytes, repeats: int = 20):
    """Median time of one Alltoall with `s` bytes to each rank, for each s (the slowest
    rank's median, since a collective ends when its last rank does).   -> (S,) seconds."""
    ranks, out = comm.Get_size(), []
    for size in sizes_bytes:
        send = np.ones(ranks * int(size), dtype=np.uint8)                  # (Q s,)
        recv = np.empty_like(send)
        times = []
        for _ in range(repeats):
            comm.Barrier()
            start = time.perf_counter()
            comm.Alltoall(send, recv)
            times.append(time.perf_counter() - start)
        out.append(max(comm.allgather(float(np.median(times)))))
    return np.array(out)


def fit_alpha_beta(sizes_bytes, seconds):
    """t = alpha + beta s fitted by least squares on *relative* errors (each equation divided
    by its t), so sizes spanning decades all count: alpha the latency (s), 1 / beta the
    bandwidth (B/s)."""
    t = np.asarray(seconds, np.float64)                                    # (S,)
    a = np.stack([np.ones(len(t)), np.asarray(sizes_bytes, np.float64)], axis=1) / t[:, None]
    (alpha, beta), *_ = np.linalg.lstsq(a, np.ones(len(t)), rcond=None)
    return float(alpha), float(beta)


# -- the paper model: a DeepSeek-V3-sized layer ---------------------------------------------

class Hardware(NamedTuple):
    """Per-GPU figures. Sources (vendors' published peaks, one direction of each link):
    NVIDIA H800 SXM: NVLink 400 GB/s total bidirectional -> 200 GB/s each way (H100 SXM:
    900 GB/s); dense BF16 989 TFLOP/s (H100/H800 SXM datasheet). NVIDIA ConnectX-7: one
    400 Gb/s NDR InfiniBand port per GPU -> 50 GB/s each way."""
    name: str
    nvlink: float          # bytes/s, one direction, per GPU
    infiniband: float      # bytes/s, one direction, per GPU
    flops: float           # dense BF16 FLOP/s
    gpus_per_node: int


H800 = Hardware("H800 + ConnectX-7", 200e9, 50e9, 989e12, 8)


class LayerShape(NamedTuple):
    """DeepSeek-V3's MoE layer (its config.json: hidden_size 7168, moe_intermediate_size
    2048, n_routed_experts 256, num_experts_per_tok 8, n_group 8, topk_group 4) on EP = 64."""
    d_model: int = 7168
    d_hidden: int = 2048
    num_experts: int = 256
    k: int = 8
    ep: int = 64
    tokens_per_gpu: int = 4096        # one micro-batch of one 4096-token sequence
    dispatch_bytes: float = 1 + 4 / 128   # fp8 value + one fp32 scale per 128 (DeepSeek-V3)
    combine_bytes: float = 2.0        # bf16
    utilization: float = 0.5          # fraction of peak FLOP/s the expert GEMMs reach


def copies_per_token(shape: LayerShape, gpus_per_node: int, max_nodes: int | None,
                     samples: int = 20000, seed: int = 0):
    """Mean remote nodes and remote GPUs a token's K experts fall on, for balanced routing:
    scores uniform at random; with max_nodes, chapter 8's group-limited mask with one group
    per node keeps the token on at most max_nodes nodes. The token's home GPU is GPU 0.
    -> (remote nodes, remote GPUs), means over `samples` tokens."""
    nodes = shape.ep // gpus_per_node
    scores = np.random.default_rng(seed).random((samples, shape.num_experts))   # (Z, E)
    if max_nodes is not None:
        scores = np.where(group_limited_mask(scores, nodes, max_nodes), scores, -np.inf)
    ids = top_k_indices(scores, shape.k)                                   # (Z, K)
    gpu = ids // (shape.num_experts // shape.ep)                           # (Z, K)
    node = gpu // gpus_per_node                                            # (Z, K)
    remote_nodes = nodes_spanned(np.where(node != 0, node, -1)).mean()
    remote_gpus = nodes_spanned(np.where(gpu != 0, gpu, -1)).mean()
    return float(remote_nodes), float(remote_gpus)


def layer_model(shape: LayerShape, hw: Hardware, max_nodes: int | None) -> dict:
    """Bytes and times of one layer's forward + backward on one GPU (see the chapter for every
    assumption). A token crosses InfiniBand once per remote node (deduplicated, then forwarded
    over NVLink to each GPU there); forward dispatch in fp8, the other three exchanges (combine,
    and both of the backward) in bf16."""
    nodes, gpus = copies_per_token(shape, hw.gpus_per_node, max_nodes)
    per_copy = shape.d_model * (shape.dispatch_bytes + 3 * shape.combine_bytes)   # 4 exchanges
    ib = shape.tokens_per_gpu * nodes * per_copy                          # bytes
    nvl = shape.tokens_per_gpu * gpus * per_copy                          # bytes
    comm = max(ib / hw.infiniband, nvl / hw.nvlink)                       # s, links in parallel
    flops = 3 * shape.tokens_per_gpu * shape.k * 6 * shape.d_model * shape.d_hidden   # fwd + bwd
    compute = flops / (hw.flops * shape.utilization)                      # s
    return {"remote_nodes": nodes, "remote_gpus": gpus, "ib_bytes": ib, "nvlink_bytes": nvl,
            "comm_s": comm, "compute_s": compute, "serial_s": comm + compute,
            "overlap_s": max(comm, compute)}
