"""A Rosetta to HF transformers, for one MoE block and for a whole causal language model.

    layer = from_hf(arch, state_dict, config, *, seq_len=None)     a block   (blocks.py, chapter 8)
    state_dict, config = to_hf(arch, layer, style=None)
    model = from_hf_model(arch, state_dict, config)                 a model   (model.py, chapter 9)
    state_dict, config = to_hf_model(arch, model, style="fused")

Nothing here imports torch or transformers: state dicts are NumPy arrays under
HF's own key names, configs are HF's config fields as plain dicts.
"""
from moe_np.interop.blocks import (ARCH, ARCHS, STYLES, capacity_factor_for, dispatch, from_hf,
                                   hf_layout, to_hf)
from moe_np.interop.model import (LM_ARCHS, from_hf_model, hf_config_of, key_map,
                                  lm_config_from_hf, to_hf_model)

__all__ = ["ARCH", "ARCHS", "STYLES", "capacity_factor_for", "dispatch", "from_hf", "hf_layout",
           "to_hf", "LM_ARCHS", "from_hf_model", "hf_config_of", "key_map", "lm_config_from_hf",
           "to_hf_model"]
