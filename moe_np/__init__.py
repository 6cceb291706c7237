"""moe_np: a from-scratch, autograd-free Mixture-of-Experts in NumPy."""
__version__ = "0.1.0"
