"""moe_np: a from-scratch, autograd-free Mixture-of-Experts in NumPy."""
from moe_np.config import DenseConfig, SparseConfig
from moe_np.dense import DenseMoE
from moe_np.sparse import SparseMoE

__all__ = ["DenseConfig", "DenseMoE", "SparseConfig", "SparseMoE"]
__version__ = "0.1.0"
