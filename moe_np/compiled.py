"""Modules of compiled loops, imported on first use, so that `import moe_np` never loads numba.

    load(name)   moe_np.<name> (attention_kernels, optim_kernels, lowp_kernels), or None:
                 numba is not installed, or NUMBA_DISABLE_JIT=1 (the loops would run as
                 slow Python)

Where load gives None the caller runs the loops' NumPy twins, which give the same bits,
more slowly. The tests call the loops themselves under NUMBA_DISABLE_JIT=1.
"""
from __future__ import annotations

import importlib

_LOADED: dict = {}


def load(name: str):
    """moe_np.<name>, or None without numba or with its JIT disabled (see the module doc)."""
    if name not in _LOADED:
        try:
            import numba
        except ImportError:
            _LOADED[name] = None
        else:
            jit = not numba.config.DISABLE_JIT
            _LOADED[name] = importlib.import_module(f"moe_np.{name}") if jit else None
    return _LOADED[name]
