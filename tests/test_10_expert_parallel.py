"""Chapter 10: expert parallelism over MPI.

The MPI tests start their own jobs (`mpiexec -n 4` and `-n 2`, each a
subprocess with a timeout) and batch many cases into one launch: every rank
runs its shard through ExpertParallelMoE and the whole batch through
one-process SparseMoE, and the verdicts are bit-for-bit comparisons. Without
mpi4py they are reported as skipped, with the install command as the reason.
"""
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from moe_np import SparseConfig
from moe_np.dispatch.plan import plan_token_choice
from moe_np.parallel import costs, per_rank_capacity
from moe_np.parallel import plan as ep_plan
from moe_np.parallel.groups import AgreedError
from moe_np.parallel.launch import INSTALL, mpi_available, run_mpi

needs_mpi = pytest.mark.skipif(not mpi_available(), reason=f"needs mpi4py and mpiexec: {INSTALL}")
ROOT = Path(__file__).resolve().parent.parent
BASE = {"d_model": 6, "num_experts": 8, "d_hidden": 5, "k": 2}


def case(name, kind="step", dtype="float64", **fields):
    options = {k: fields.pop(k) for k in list(fields)
               if k in ("mask_fraction", "sizes", "tokens_per_rank", "selection_bias", "grad_sync",
                        "ep", "dp", "training", "reference", "steps", "ranks_per_node", "wrt")}
    return {"name": name, "kind": kind, "dtype": dtype, "config": BASE | fields} | options


def equivalence_cases():
    """Router kinds, drop policies, capacities, masks, shared experts, dtypes, E = ep and 4 ep."""
    out = []
    for dt in ("float64", "float32"):
        out += [case(f"softmax_topk {dt}", dtype=dt, balance_coef=0.01, z_coef=0.001),
                case(f"switch {dt}", dtype=dt, router="switch", k=1, capacity_factor=1.25,
                     balance_coef=0.01, jitter=0.1),
                case(f"deepseek {dt}", dtype=dt, router="sigmoid_bias", n_group=4, topk_group=2,
                     bias_gamma=0.01, routed_scaling_factor=2.5, seq_len=4, seq_aux_coef=0.01),
                case(f"noisy {dt}", dtype=dt, router="noisy_topk", cv_coef=0.01, capacity_factor=1.0),
                case(f"capacity random {dt}", dtype=dt, capacity_factor=0.75, drop_policy="random"),
                case(f"mask {dt}", dtype=dt, capacity_factor=1.0, balance_coef=0.01, mask_fraction=0.3),
                case(f"E=4ep {dt}", dtype=dt, num_experts=16, k=3, capacity_factor=1.5),
                case(f"expert choice {dt}", dtype=dt, router="expert_choice", capacity_factor=1.0,
                     z_coef=0.01, num_shared=1)]
    out += [case("softmax_topk_raw", router="softmax_topk_raw"),
            case("topk_softmax", router="topk_softmax", capacity_factor=1.0),
            case("sigmoid unnormalized", router="sigmoid_bias", norm_topk_prob=False),
            case("capacity position", capacity_factor=0.75, min_capacity=1),
            case("capacity priority", capacity_factor=0.75, drop_policy="priority"),
            case("capacity per sequence", capacity_factor=1.0, capacity_scope="sequence", seq_len=4),
            case("capacity per source rank", capacity_factor=0.75, capacity_scope="sequence",
                 seq_len=8, drop_policy="priority"),                   # per_rank_capacity(config, 8)
            case("mask sigmoid", router="sigmoid_bias", capacity_factor=1.0, bias_gamma=0.01,
                 mask_fraction=0.3),
            case("shared gated", num_shared=2, shared_gate=True, d_hidden_shared=3),
            case("swiglu experts", expert="swiglu", capacity_factor=1.0, num_shared=1),
            case("E=ep", num_experts=4, capacity_factor=1.0),
            case("numpy dispatch", dispatch="numpy", capacity_factor=1.0, num_shared=1),
            case("uneven shards", sizes=[2, 9, 3, 6], capacity_factor=1.0),
            case("evaluation", training=False, router="noisy_topk", drop_policy="random",
                 capacity_factor=1.0),
            case("fp16 compute", dtype="float32", precision={"compute": "fp16"}),
            case("no rows to rank 3", router="sigmoid_bias", selection_bias=[0] * 6 + [-9, -9]),
            case("every token to rank 0", router="sigmoid_bias", selection_bias=[9, 9] + [0] * 6)]
    return out


SPECIAL = [case("allreduce", grad_sync="allreduce", num_shared=1, balance_coef=0.01),
           case("dp2 ep2", "training", num_shared=1, balance_coef=0.01, ep=2, dp=2),
           case("dp2 ep2 capacity", "training", capacity_factor=1.0, drop_policy="random", ep=2, dp=2,
                reference={"capacity_scope": "sequence", "seq_len": 16}),
           case("dp2 ep2 allreduce", "training", num_shared=1, ep=2, dp=2, grad_sync="allreduce"),
           case("dp4 ep1", "training", dtype="float32", router="sigmoid_bias", bias_gamma=0.01,
                ep=1, dp=4),
           case("ep4 training", "training", router="noisy_topk", cv_coef=0.01, capacity_factor=1.0),
           case("expert choice training", "training", router="expert_choice", capacity_factor=0.5),
           case("traffic free", "traffic", router="sigmoid_bias", k=4),
           case("traffic one node", "traffic", router="sigmoid_bias", k=4, n_group=2, topk_group=1),
           case("traffic capacity", "traffic", dtype="float32", capacity_factor=0.75)]
TWO_RANKS = [case("2 ranks E=ep", num_experts=2, k=1, router="switch", capacity_factor=1.0),
             case("2 ranks E=4ep", capacity_factor=1.0, drop_policy="priority", num_shared=1),
             case("2 ranks float32 mask", dtype="float32", balance_coef=0.01, mask_fraction=0.25),
             case("2 ranks dp2 ep1", "training", ep=1, dp=2, capacity_factor=1.0,
                  reference={"capacity_scope": "sequence", "seq_len": 8}),
             case("2 ranks finite differences", "gradcheck", d_model=4, num_experts=4, d_hidden=6,
                  balance_coef=0.1, z_coef=0.01, num_shared=1, router_scale=1.0,
                  wrt=["x", "w_router", "b2", "shared_b2"])]
FOUR_RANKS = equivalence_cases() + SPECIAL


def launch(cases, ranks, tmp_path_factory, timeout=150):
    path = tmp_path_factory.mktemp("mpi") / "cases.json"
    path.write_text(json.dumps(cases))
    done = run_mpi(["-m", "moe_np.parallel.cases", str(path)], ranks, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return {r["name"]: r for r in map(json.loads, done.stdout.splitlines())}


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    return launch(FOUR_RANKS, 4, tmp_path_factory)


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    return launch(TWO_RANKS, 2, tmp_path_factory)


def failing(result):
    return [k for k, v in result["checks"].items() if not v]


@needs_mpi
@pytest.mark.parametrize("name", [c["name"] for c in equivalence_cases()])
def test_four_ranks_equal_one_process_bit_for_bit(four, name):
    assert four[name]["identical"], f"{name}: differs in {failing(four[name])}"


@needs_mpi
@pytest.mark.parametrize("name", [c["name"] for c in TWO_RANKS if c["kind"] != "gradcheck"])
def test_two_ranks_equal_one_process_bit_for_bit(two, name):
    assert two[name]["identical"], f"{name}: differs in {failing(two[name])}"


@needs_mpi
def test_central_differences_agree_with_the_distributed_backward(two):
    """gradcheck.check_pair on the 2-rank layer itself (float64, random upstream gradient,
    routing choices guarded): x through both exchanges, the router's gathered gradient, an
    expert's and a shared expert's."""
    r = two["2 ranks finite differences"]
    assert r["identical"], f"finite differences disagree for {failing(r)}"


@needs_mpi
def test_a_rank_can_receive_no_rows_and_one_rank_can_receive_all(four):
    assert four["no rows to rank 3"]["rows_received"][3] == 0
    assert four["every token to rank 0"]["rows_received"] == [4 * 8 * 2, 0, 0, 0]
    assert four["capacity random float64"]["dropped"] > 0


@needs_mpi
@pytest.mark.parametrize("name", ["dp2 ep2", "dp2 ep2 capacity", "dp4 ep1", "ep4 training",
                                  "expert choice training"])
def test_training_on_ranks_leaves_one_process_parameters(four, name):
    assert four[name]["identical"], f"{name}: differs in {failing(four[name])}"


@needs_mpi
def test_allreduce_of_partial_gradients_is_close_but_not_one_process(four):
    r = four["allreduce"]
    assert r["checks"]["y"] and r["checks"]["dx"] and r["checks"]["grad w1"]
    assert not r["checks"]["grad w_router"] and r["max_abs_diff"] < 1e-13
    trained = four["dp2 ep2 allreduce"]          # expert gradients summed over the replicas
    assert not trained["identical"] and trained["max_abs_diff"] < 1e-13


@needs_mpi
@pytest.mark.parametrize("name", ["traffic free", "traffic one node", "traffic capacity"])
def test_bytes_sent_equal_the_plans_prediction(four, name):
    r = four[name]
    assert r["measured"] == r["predicted"] and sum(r["measured"]) > 0


@needs_mpi
def test_node_limited_routing_stays_within_its_nodes(four):
    free, limited = four["traffic free"], four["traffic one node"]
    assert limited["max_nodes"] == 1 < free["max_nodes"]
    assert limited["deduplicated"] < free["deduplicated"]


AGREED = {"experts": "num_experts=9 is not divisible by the expert-parallel size ep=2",
          "sizes": "dp * ep must equal the world size",
          "config": "k is 2 on rank 0 but 3 on rank 1",
          "seed": "seed is 0 on rank 0 but 1 on rank 1"}


@needs_mpi
@pytest.mark.parametrize("name", sorted(AGREED))
def test_a_misbuilt_job_stops_on_every_rank_with_one_message(name):
    done = run_mpi(["-m", "moe_np.parallel.cases", "--fault", name], 2, timeout=30)
    assert done.returncode == 2
    assert done.stderr.count("error:") == 1 and AGREED[name] in done.stderr, done.stderr


@needs_mpi
def test_a_bad_batch_on_one_rank_ends_the_whole_job_quickly():
    start = time.perf_counter()
    try:
        done = run_mpi(["-m", "moe_np.parallel.cases", "--fault", "batch"], 4, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("a bad batch on one rank left the others waiting (timeout)")
    assert done.returncode != 0 and time.perf_counter() - start < 20
    assert "rank 3 of 4" in done.stderr and "non-finite" in done.stderr
    assert "no error" not in done.stdout


# -- the pieces, without MPI -----------------------------------------------------------------

def test_owners_keep_exactly_the_assignments_one_process_keeps():
    """Split a batch over 4 'ranks' by hand: every rank's claims, merged and cut at C by
    keep_first, keep the same assignments as the one-process plan under capacity C."""
    rng = np.random.default_rng(3)
    a, k, e, ranks, cap = 24, 2, 8, 4, 4
    ids = np.argsort(rng.random((a, e)), axis=1)[:, :k]                 # (Z, K) distinct
    order = rng.permutation(a)
    one = plan_token_choice(ids, e, cap, order)
    layout, pos = ep_plan.Layout(e, ranks), ep_plan.claim_positions(order)
    claims, homes = [], []
    for q in range(ranks):
        rows = slice(6 * q, 6 * q + 6)
        home = ep_plan.home_plan(ids[rows], e, ep_plan.local_order(pos[rows]),
                                 np.ones((6, k), dtype=bool))
        claims.append(ep_plan.row_claims(home, layout, k, pos[rows], a))
        homes.append(home)
    kept = 0
    for p in range(ranks):                                              # each owner
        mine = [c[(c[:, 0] >= 0) & (np.repeat(np.arange(e), h.counts) // 2 == p)]
                for c, h in zip(claims, homes)]
        arrival = ep_plan.arrange(np.concatenate(mine), layout.local)
        kept += int(ep_plan.keep_first(arrival, cap).sum())
        assert np.array_equal(np.diff(arrival.offsets).clip(max=cap), one.counts[2 * p:2 * p + 2])
    assert kept == len(one.rows_token)


def test_claims_sort_rows_into_one_process_order():
    rng = np.random.default_rng(0)
    claims = np.stack([rng.integers(0, 3, 20), rng.permutation(20)], axis=1)   # (I, 2)
    arrival = ep_plan.arrange(claims, 3)
    assert np.array_equal(arrival.claims, sorted(claims.tolist(), key=lambda c: (c[0], c[1])))
    assert np.array_equal(np.diff(arrival.offsets), np.bincount(claims[:, 0], minlength=3))


def test_layout_errors_name_the_sizes():
    with pytest.raises(AgreedError, match="num_experts=6 is not divisible .* ep=4"):
        ep_plan.check_layout("f", 6, 4, 1, 4)
    with pytest.raises(AgreedError, match="dp \\* ep must equal the world size"):
        ep_plan.check_layout("f", 8, 2, 1, 4)


def test_what_the_layer_cannot_do_is_refused_before_any_communication():
    """comm=None: the checks must fire before the communicator is touched."""
    from moe_np.parallel import ExpertParallelMoE
    with pytest.raises(ValueError, match="grad_sync='gather'"):
        ExpertParallelMoE(SparseConfig(**BASE, router="expert_choice", capacity_factor=1.0), None,
                          grad_sync="allreduce")
    with pytest.raises(ValueError, match="einsum"):
        ExpertParallelMoE(SparseConfig(**BASE, dispatch="einsum"), None)
    with pytest.raises(ValueError, match="grad_sync must be one of"):
        ExpertParallelMoE(SparseConfig(**BASE), None, grad_sync="sum")


def test_the_one_process_twin_counts_capacity_per_expert_parallel_group():
    from moe_np.parallel import one_process_twin
    config = SparseConfig(**BASE, capacity_factor=1.0)
    assert one_process_twin(config, 1, 32) is config
    twin = one_process_twin(config, 2, 32)
    assert (twin.capacity_scope, twin.seq_len) == ("sequence", 32)
    assert one_process_twin(SparseConfig(**BASE), 2, 32).capacity_factor is None


def test_per_rank_capacity_is_one_process_capacity_per_sequence():
    config = per_rank_capacity(SparseConfig(**BASE, capacity_factor=1.0), 8)
    assert (config.capacity_scope, config.seq_len) == ("sequence", 8)


def test_alpha_beta_fit_recovers_a_known_line():
    sizes = np.array([1e3, 1e4, 1e5, 1e6])
    alpha, beta = costs.fit_alpha_beta(sizes, 2e-6 + sizes / 5e9)
    assert alpha == pytest.approx(2e-6) and 1 / beta == pytest.approx(5e9)


def test_node_limited_routing_in_the_paper_model_cuts_infiniband_bytes():
    shape = costs.LayerShape()
    free = costs.layer_model(shape, costs.H800, None)
    limited = costs.layer_model(shape, costs.H800, 4)
    assert limited["remote_nodes"] <= 4 and limited["ib_bytes"] < 0.8 * free["ib_bytes"]
    assert free["overlap_s"] == max(free["comm_s"], free["compute_s"])


def test_nodes_spanned_ignores_negative_entries():
    assert costs.nodes_spanned(np.array([[0, 0, 1], [-1, 2, 2], [-1, -1, -1]])).tolist() == [2, 1, 0]


# -- the command line --------------------------------------------------------------------------

def test_parallel_command_without_mpiexec_says_how_to_start_it():
    done = subprocess.run([sys.executable, "-m", "moe_np", "parallel"], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 2 and "mpiexec -n 4 python -m moe_np parallel" in done.stderr


@needs_mpi
def test_parallel_command_checks_trains_and_reports():
    done = run_mpi(["-m", "moe_np", "parallel", "--steps", "1", "--tokens-per-rank", "8",
                    "--dp", "2"], 2, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("bit-identical") == 2
    for words in ("rows received per rank", "imbalance max/mean", "alpha", "bandwidth",
                  "bytes sent to other ranks"):
        assert words in done.stdout


def test_without_mpi_a_chapter_fence_shows_its_committed_output_and_figures(monkeypatch, tmp_path,
                                                                            capsys):
    from moe_np.parallel import launch
    monkeypatch.setattr(launch, "mpi_available", lambda: False)
    monkeypatch.setenv("MOE_NP_FIGURES", str(tmp_path))
    code = '# mpiexec -n 4\nfig.savefig(figure_path("10-costs.png"))\n'
    launch.run_fence(code, "the committed lines\n", "10-x.md[fence 2]")
    captured = capsys.readouterr()
    assert captured.out == "the committed lines\n" and "MPI is not installed" in captured.err
    assert (tmp_path / "10-costs.png").exists()
