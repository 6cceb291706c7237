"""Configurations: frozen, keyword-only dataclasses, validated once, here.

    DenseConfig      a dense mixture: sizes, gate, experts, temperature, gate dropout
    SparseConfig     a sparse layer: sizes, router, K, capacity and drop policy,
                     auxiliary-loss coefficients, the selection-bias step,
                     dispatch, and its PrecisionConfig
    PrecisionConfig  which number format the experts and the router compute in

Every cross-field rule lives in `__post_init__`, so a layer built from a
config never meets a combination it cannot honour.
"""
from __future__ import annotations

from dataclasses import dataclass

from moe_np import validate
from moe_np.dispatch import POLICIES, STRATEGIES
from moe_np.experts import EXPERTS
from moe_np.gates import GATES
from moe_np.precision import FORMATS
from moe_np.routers import ROUTERS, check_groups

# the kinds a config may name: read from the registries that implement them
EXPERT_KINDS = tuple(EXPERTS)
GATE_KINDS = tuple(GATES)
ROUTER_KINDS = tuple(ROUTERS)
SOFTMAX_ROUTERS = tuple(name for name, kind in ROUTERS.items() if kind.softmax)
DROP_POLICIES = POLICIES
BIAS_UPDATES = ("sign", "centred")
CAPACITY_SCOPES = ("batch", "sequence")
BALANCE_SCOPES = ("batch", "sequence")
DISPATCH_STRATEGIES = STRATEGIES
COMPUTE_FORMATS = ("fp32",) + tuple(FORMATS)
ROUTER_PRECISIONS = ("fp32", "compute")
FP8_SCALINGS = ("tensor", "tile", "mx")


_one_of = validate.one_of
_sizes = validate.sizes


def _non_negative(owner: str, **values) -> None:
    for name, value in values.items():
        validate.non_negative(owner, name, value)


@dataclass(frozen=True, kw_only=True)
class PrecisionConfig:
    """Simulated low precision: operands rounded to `compute`, float32 accumulation,
    outputs rounded (see lowp.py for the named steps).

    fp32 (the default) rounds nothing. router "fp32" keeps the router
    (projection, softmax or sigmoid, top-K, selection bias) in float32 while
    the experts run low (selective precision, as Switch and DeepSeek-V3 do);
    "compute" runs it in the experts' format too.
    """
    compute: str = "fp32"             # fp32 | fp16 | bf16 | fp8_e4m3 | fp8_e5m2
    router: str = "fp32"              # fp32 | compute
    fp8_scaling: str = "tile"         # tensor | tile (1x128 activations, 128x128 weights) | mx

    def __post_init__(self):
        _one_of("PrecisionConfig", "compute", self.compute, COMPUTE_FORMATS)
        _one_of("PrecisionConfig", "router", self.router, ROUTER_PRECISIONS)
        _one_of("PrecisionConfig", "fp8_scaling", self.fp8_scaling, FP8_SCALINGS)


@dataclass(frozen=True, kw_only=True)
class DenseConfig:
    """A dense mixture: y = sum_e g_e(x) f_e(x) over all E experts."""
    d_model: int                 # D
    num_experts: int             # E
    d_hidden: int                # H, each expert's hidden width
    gate: str = "softmax"        # softmax | mlp | per_dim
    expert: str = "mlp"          # mlp (ReLU) | swiglu
    temperature: float = 1.0     # softmax temperature of the gate
    gate_dropout: float = 0.0    # inverted dropout on the gate weights, training only
    gate_hidden: int = 16        # the MLP gate's hidden width
    router_scale: float = 0.1    # std of the initial gate weights (near-uniform mixing)

    def __post_init__(self):
        _sizes("DenseConfig", d_model=self.d_model, num_experts=self.num_experts,
               d_hidden=self.d_hidden, gate_hidden=self.gate_hidden)
        _one_of("DenseConfig", "gate", self.gate, GATE_KINDS)
        _one_of("DenseConfig", "expert", self.expert, EXPERT_KINDS)
        validate.positive("DenseConfig", "temperature", self.temperature)
        validate.probability("DenseConfig", "gate_dropout", self.gate_dropout)
        validate.positive("DenseConfig", "router_scale", self.router_scale)


@dataclass(frozen=True, kw_only=True)
class SparseConfig:
    """A sparse layer: each token goes to K of E experts, under a capacity.

    capacity_factor None means dropless. For expert_choice, k is unused and
    each expert takes C = ceil(capacity_factor * N / E) tokens.
    """
    d_model: int                          # D
    num_experts: int                      # E
    d_hidden: int                         # H
    num_shared: int = 0                   # shared experts, seen by every token
    expert: str = "mlp"                   # mlp (ReLU) | swiglu
    router: str = "softmax_topk"          # see ROUTER_KINDS and routers.py
    k: int = 2                            # experts per token
    capacity_factor: float | None = None  # C = ceil(factor * K * N / E); None: dropless
    min_capacity: int = 0
    drop_policy: str = "position"         # position | priority | random
    balance_coef: float = 0.0             # Switch/GShard balance loss (softmax routers)
    z_coef: float = 0.0                   # router z-loss
    cv_coef: float = 0.0                  # importance + load-estimate CV^2 (noisy_topk)
    bias_gamma: float = 0.0               # loss-free selection-bias step (sigmoid_bias)
    dispatch: str = "numba"               # numba (the hot path) | numpy (reference) | einsum
    router_scale: float = 0.1             # std of the initial router weights
    precision: PrecisionConfig = PrecisionConfig()   # fp32 unless asked
    # DeepSeek-V3 (sigmoid_bias router)
    n_group: int = 1                      # expert groups for group-limited routing
    topk_group: int = 1                   # groups that stay eligible per token
    norm_topk_prob: bool = True           # weights s / sum s[ids] (else s[ids])
    routed_scaling_factor: float = 1.0    # routed weights times this factor
    bias_update: str = "sign"             # sign | centred (subtract the mean sign term)
    seq_aux_coef: float = 0.0             # sequence-wise balance loss (needs seq_len)
    # scope of the balance statistics
    seq_len: int | None = None            # tokens per sequence: N = batch * seq_len
    capacity_scope: str = "batch"         # batch | sequence (capacity counted per sequence)
    balance_scope: str = "batch"          # batch | sequence (balance loss: mean of per-sequence losses)
    # shared experts (Qwen2-MoE) and router input noise (Switch)
    shared_gate: bool = False             # shared output times sigmoid(x w_shared_gate)
    d_hidden_shared: int | None = None    # shared experts' hidden width (default d_hidden)
    jitter: float = 0.0                   # router input times U(1 - jitter, 1 + jitter), training

    def __post_init__(self):
        own = "SparseConfig"
        _sizes(own, d_model=self.d_model, num_experts=self.num_experts, d_hidden=self.d_hidden)
        _one_of(own, "router", self.router, ROUTER_KINDS)
        _one_of(own, "expert", self.expert, EXPERT_KINDS)
        _one_of(own, "drop_policy", self.drop_policy, DROP_POLICIES)
        _one_of(own, "dispatch", self.dispatch, DISPATCH_STRATEGIES)
        validate.integer(own, "k", self.k)
        _non_negative(own, num_shared=self.num_shared, min_capacity=self.min_capacity,
                      balance_coef=self.balance_coef, z_coef=self.z_coef, cv_coef=self.cv_coef,
                      bias_gamma=self.bias_gamma)
        validate.positive(own, "router_scale", self.router_scale)
        if not isinstance(self.precision, PrecisionConfig):
            raise ValueError(f"{own}: precision must be a PrecisionConfig, got {self.precision!r}")
        if self.precision.compute != "fp32" and self.dispatch == "einsum":
            raise ValueError(f"{own}: precision.compute={self.precision.compute!r} runs the experts "
                             f"on the ragged layout; use dispatch 'numpy' or 'numba', not 'einsum'")
        self._check_capacity()
        self._check_router_options()
        self._check_deepseek()
        self._check_scope_and_shared()

    def _check_capacity(self):
        if self.capacity_factor is not None:
            validate.positive("SparseConfig", "capacity_factor", self.capacity_factor)
        elif self.router == "expert_choice":
            raise ValueError("SparseConfig: expert_choice needs a capacity_factor "
                             "(each expert takes C = ceil(capacity_factor * N / E) tokens)")
        if self.router != "expert_choice":
            validate.top_k("SparseConfig", self.k, self.num_experts)

    def _check_router_options(self):
        own, router = "SparseConfig", self.router
        if router == "switch" and self.k != 1:
            raise ValueError(f"{own}: the switch router sends each token to one expert, got k={self.k}")
        if router == "noisy_topk" and self.k == self.num_experts:
            raise ValueError(f"{own}: noisy_topk needs k < num_experts for its load estimate, "
                             f"got k={self.k}, num_experts={self.num_experts}")
        if self.balance_coef and router not in SOFTMAX_ROUTERS:
            raise ValueError(f"{own}: balance_coef needs a softmax router {SOFTMAX_ROUTERS} "
                             f"(its P_i is the mean softmax probability), got router={router!r}")
        if self.cv_coef and router != "noisy_topk":
            raise ValueError(f"{own}: cv_coef (importance and load CV^2) needs router="
                             f"'noisy_topk', got {router!r}")
        if self.bias_gamma and router != "sigmoid_bias":
            raise ValueError(f"{own}: bias_gamma={self.bias_gamma} needs router='sigmoid_bias', "
                             f"got {router!r}")

    def _check_deepseek(self):
        own = "SparseConfig"
        _one_of(own, "bias_update", self.bias_update, BIAS_UPDATES)
        _sizes(own, n_group=self.n_group, topk_group=self.topk_group)
        _non_negative(own, seq_aux_coef=self.seq_aux_coef)
        validate.positive(own, "routed_scaling_factor", self.routed_scaling_factor)
        custom = {"n_group": self.n_group != 1, "topk_group": self.topk_group != 1,
                  "norm_topk_prob": not self.norm_topk_prob,
                  "routed_scaling_factor": self.routed_scaling_factor != 1.0,
                  "seq_aux_coef": self.seq_aux_coef > 0}
        for name, used in custom.items():
            if used and self.router != "sigmoid_bias":
                raise ValueError(f"{own}: {name}={getattr(self, name)} needs router='sigmoid_bias' "
                                 f"(DeepSeek-V3's router), got {self.router!r}")
        if self.router == "sigmoid_bias":
            check_groups(own, self.num_experts, self.k, self.n_group, self.topk_group)
        if self.seq_aux_coef and self.seq_len is None:
            raise ValueError(f"{own}: seq_aux_coef={self.seq_aux_coef} needs seq_len "
                             "(the loss is computed per sequence)")

    def _check_scope_and_shared(self):
        own = "SparseConfig"
        _one_of(own, "capacity_scope", self.capacity_scope, CAPACITY_SCOPES)
        _one_of(own, "balance_scope", self.balance_scope, BALANCE_SCOPES)
        if self.balance_scope == "sequence" and self.seq_len is None:
            raise ValueError(f"{own}: balance_scope='sequence' averages the balance loss of each "
                             "sequence; it needs seq_len")
        if self.seq_len is not None:
            _sizes(own, seq_len=self.seq_len)
        if self.capacity_scope == "sequence" and (self.seq_len is None or self.capacity_factor is None
                                                  or self.router == "expert_choice"):
            raise ValueError(f"{own}: capacity_scope='sequence' needs seq_len, a capacity_factor "
                             f"and a token-choice router; got seq_len={self.seq_len}, "
                             f"capacity_factor={self.capacity_factor}, router={self.router!r}")
        if self.d_hidden_shared is not None:
            _sizes(own, d_hidden_shared=self.d_hidden_shared)
        if (self.shared_gate or self.d_hidden_shared is not None) and not self.num_shared:
            raise ValueError(f"{own}: shared_gate and d_hidden_shared need num_shared >= 1, "
                             f"got num_shared={self.num_shared}")
        validate.probability(own, "jitter", self.jitter)


@dataclass(frozen=True, kw_only=True)
class LMConfig:
    """A decoder-only language model: pre-norm blocks of causal attention and an FFN.

    Block i's FFN is a SparseMoE(moe) when moe is given and (i + 1) % moe_every == 0
    (Qwen2-MoE's decoder_sparse_step), else a dense SwiGLU of width d_ffn. The head
    width is d_model / num_heads; num_kv_heads < num_heads is grouped-query attention.
    """
    vocab_size: int                       # V
    d_model: int                          # D
    num_layers: int                       # decoder blocks
    num_heads: int                        # A, query heads
    num_kv_heads: int                     # P, key/value heads (divides A)
    context_length: int                   # longest sequence the model takes
    moe: SparseConfig | None = None       # the MoE blocks' layer; None: every block dense
    moe_every: int = 1                    # block i is MoE when (i + 1) % moe_every == 0
    d_ffn: int | None = None              # dense blocks' SwiGLU hidden width
    rope_theta: float = 10000.0           # RoPE base
    rms_eps: float = 1e-6                 # RMSNorm's epsilon
    tie_embeddings: bool = False          # the LM head reuses the embedding table
    qkv_bias: bool = False                # biases on q, k, v projections (Qwen2)

    def __post_init__(self):
        own = "LMConfig"
        _sizes(own, vocab_size=self.vocab_size, d_model=self.d_model, num_layers=self.num_layers,
               num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
               context_length=self.context_length, moe_every=self.moe_every)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{own}: num_kv_heads={self.num_kv_heads} must divide "
                             f"num_heads={self.num_heads}")
        if self.d_model % self.num_heads:
            raise ValueError(f"{own}: num_heads={self.num_heads} must divide d_model={self.d_model}")
        head_dim = self.d_model // self.num_heads
        if head_dim % 2:
            raise ValueError(f"{own}: RoPE needs an even head dim, got head_dim=d_model/num_heads="
                             f"{head_dim}")
        validate.positive(own, "rope_theta", self.rope_theta)
        validate.positive(own, "rms_eps", self.rms_eps)
        for name in ("tie_embeddings", "qkv_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{own}: {name} must be a bool, got {getattr(self, name)!r}")
        self._check_ffn()

    def _check_ffn(self):
        own = "LMConfig"
        if self.moe is not None:
            if not isinstance(self.moe, SparseConfig):
                raise ValueError(f"{own}: moe must be a SparseConfig or None, got {type(self.moe).__name__}")
            if self.moe.d_model != self.d_model:
                raise ValueError(f"{own}: moe.d_model={self.moe.d_model} differs from d_model={self.d_model}")
            if self.moe.router == "expert_choice":
                raise ValueError(f"{own}: moe.router='expert_choice' is not causal (an expert picks "
                                 "among every token of the batch, later ones included)")
        if any(not self.is_moe(i) for i in range(self.num_layers)):
            if self.d_ffn is None:
                raise ValueError(f"{own}: d_ffn is needed for the dense blocks (moe={self.moe is not None}, "
                                 f"moe_every={self.moe_every}, num_layers={self.num_layers})")
        if self.d_ffn is not None:
            _sizes(own, d_ffn=self.d_ffn)

    @property
    def head_dim(self) -> int:
        """F = d_model / num_heads."""
        return self.d_model // self.num_heads

    def is_moe(self, layer: int) -> bool:
        """Whether block `layer` (0-based) has a SparseMoE FFN."""
        return self.moe is not None and (layer + 1) % self.moe_every == 0


# ---------------------------------------------------------------- a training run

def _layer_default(name: str):
    """SparseConfig's default for `name`: the one source of every layer setting's default."""
    return SparseConfig.__dataclass_fields__[name].default


PRECISIONS = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16", "fp8": "fp8_e4m3"}   # option -> compute
LOSS_SCALES = ("auto", "dynamic", "static", "none")
RUN_OBJECTIVE = {"balance_coef": 0.01, "z_coef": 0.001}   # what `train` adds to a bare layer's 0
LAYER_SETTINGS = ("k", "capacity_factor", "router", "dispatch", "expert", "bias_gamma",
                  "precision")   # TrainConfig fields whose default is the layer's


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything that defines a run of `python -m moe_np train` (field = option name).

    Defaults: every layer setting (router, k, capacity_factor, dispatch,
    expert, precision) is SparseConfig's own default, read from it, so a
    run and a bare layer agree: dropless, numba dispatch, fp32. The two
    auxiliary coefficients are the run's (RUN_OBJECTIVE): a bare layer adds
    no loss unless asked, a training run adds Switch's balance loss (0.01)
    and ST-MoE's z-loss (0.001). balance_coef applies to softmax routers
    only; `sparse_config()` gives the values applied, and `train` prints them.

    The data set is fixed by task and data_seed; `seed` varies the model's
    initialisation, its routing streams and the batch order. precision sets
    the sparse layers' compute format (fp8 means E4M3) and, with loss_scale
    "auto", the scaling: fp32 trains plainly; fp16 uses a dynamic LossScaler
    (2**16, GradScaler's rule); bf16 and fp8 keep fp32's exponent range or
    scale per tile inside the layer, so they use a static scale of 1, which
    still skips a step whose gradients hold an inf or NaN. Parameters are
    float32 in every case: they are the master weights.

    The learning rate warms up for `warmup` steps (None: min(100, a tenth of
    the schedule)), then follows a cosine to lr/10 at step schedule_steps
    (None: steps), and stays there: a run extended past its schedule (`train --resume
    --steps` larger) trains the extra steps at lr/10.
    """
    model: str = "moe"                     # moe | dense
    task: str = "clusters"                 # see data.TASKS
    experts: int = 8                       # E
    k: int = _layer_default("k")           # K
    capacity_factor: float | None = _layer_default("capacity_factor")   # None: dropless
    router: str = _layer_default("router")
    dispatch: str = _layer_default("dispatch")
    precision: str = PrecisionConfig().compute   # fp32 | fp16 | bf16 | fp8
    loss_scale: str = "auto"               # auto (by precision) | dynamic | static (1) | none
    steps: int = 1500
    schedule_steps: int | None = None      # the warm-up + cosine's length; None: steps
    seed: int = 0
    blocks: int = 2                        # residual blocks
    d_model: int = 32                      # D
    d_hidden: int = 32                     # H of each expert
    expert: str = _layer_default("expert")   # mlp | swiglu
    dense_match: str = "active"            # the dense model's FFN matches the MoE's active or total params
    balance_coef: float = RUN_OBJECTIVE["balance_coef"]
    z_coef: float = RUN_OBJECTIVE["z_coef"]
    bias_gamma: float = _layer_default("bias_gamma")   # loss-free bias step (router sigmoid_bias)
    batch_size: int = 256
    lr: float = 3e-3
    warmup: int | None = None              # None: min(100, schedule length // 10)
    weight_decay: float = 0.0
    clip_norm: float | None = 1.0
    data_size: int = 8000
    data_seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 500

    def __post_init__(self):
        self._check_choices()
        self._check_numbers()
        self._check_schedule()
        if self.model == "moe":
            self.sparse_config()            # the layer's own cross-field rules, before any work

    def _check_choices(self):
        from moe_np.data import TASKS
        own = "TrainConfig"
        for name, allowed in (("model", ("moe", "dense")), ("task", TASKS), ("router", ROUTER_KINDS),
                              ("dispatch", DISPATCH_STRATEGIES), ("precision", tuple(PRECISIONS)),
                              ("loss_scale", LOSS_SCALES), ("expert", EXPERT_KINDS),
                              ("dense_match", ("active", "total"))):
            validate.one_of(own, name, getattr(self, name), allowed)

    def _check_numbers(self):
        own = "TrainConfig"
        for name in ("experts", "k", "steps", "blocks", "d_model", "d_hidden", "batch_size",
                     "data_size", "log_every", "checkpoint_every"):
            validate.integer(own, name, getattr(self, name), 1)
        for name in ("seed", "data_seed"):
            validate.integer(own, name, getattr(self, name), 0)
        if self.k > self.experts:
            raise ValueError(f"{own}: k={self.k} exceeds experts={self.experts}")
        for name in ("capacity_factor", "clip_norm"):
            if getattr(self, name) is not None:
                validate.positive(own, name, getattr(self, name))
        for name in ("balance_coef", "z_coef", "bias_gamma", "weight_decay"):
            validate.non_negative(own, name, getattr(self, name))
        validate.positive(own, "lr", self.lr)

    def _check_schedule(self):
        own = "TrainConfig"
        if self.schedule_steps is not None:
            validate.integer(own, "schedule_steps", self.schedule_steps, 1)
            if self.schedule_steps > self.steps:
                raise ValueError(f"{own}: schedule_steps={self.schedule_steps} exceeds "
                                 f"steps={self.steps}")
        if self.warmup is not None:
            validate.integer(own, "warmup", self.warmup, 0)
            if self.warmup > self.schedule_length:
                raise ValueError(f"{own}: warmup={self.warmup} exceeds the schedule's "
                                 f"{self.schedule_length} steps")

    @property
    def schedule_length(self) -> int:
        """The steps the warm-up and cosine span (schedule_steps, else steps)."""
        return self.steps if self.schedule_steps is None else self.schedule_steps

    @property
    def warmup_steps(self) -> int:
        """The warm-up applied: `warmup`, or min(100, schedule_length // 10) when it is None."""
        return min(100, self.schedule_length // 10) if self.warmup is None else self.warmup

    def sparse_config(self) -> SparseConfig:
        """The SparseConfig of every block: the values applied (balance_coef 0 unless the
        router is a softmax one, whose mean probabilities the balance loss needs)."""
        return SparseConfig(d_model=self.d_model, num_experts=self.experts, d_hidden=self.d_hidden,
                            expert=self.expert, router=self.router, k=self.k,
                            capacity_factor=self.capacity_factor, dispatch=self.dispatch,
                            balance_coef=self.balance_coef if self.router in SOFTMAX_ROUTERS else 0.0,
                            z_coef=self.z_coef, bias_gamma=self.bias_gamma,
                            precision=PrecisionConfig(compute=PRECISIONS[self.precision],
                                                      router="fp32"))

    def to_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}
