"""HF config fields, read and checked: one rule for the block Rosetta (blocks.py) and the
whole-model one (model.py).

    hf_value(owner, config, name, kind, default)   config[name] checked against KINDS[kind]
    REQUIRED                                        the default of a field that must be there
"""
from __future__ import annotations

REQUIRED = object()   # a config field with no default


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


KINDS = {   # an HF config field's kind: (its test, what it must be)
    "size": (lambda v: _number(v) and isinstance(v, int) and v >= 1, "an integer >= 1"),
    "flag": (lambda v: isinstance(v, bool), "a bool"),
    "coef": (lambda v: _number(v) and v >= 0, "a number >= 0"),
    "number": (lambda v: _number(v) and v > 0, "a number > 0"),
    "str": (lambda v: isinstance(v, str), "a string")}


def hf_value(owner: str, config: dict, name: str, kind: str, default):
    """config[name] checked against its kind (KINDS; a "coef" as a float), or `default` when
    absent (REQUIRED: it must be there). owner starts each error: "from_hf: mixtral config"."""
    if name not in config:
        if default is REQUIRED:
            raise ValueError(f"{owner} is missing the field {name!r}")
        return default
    value = config[name]
    test, need = KINDS[kind]
    if not test(value):
        raise ValueError(f"{owner} field {name!r} must be {need}, got {value!r}")
    return float(value) if kind == "coef" else value
