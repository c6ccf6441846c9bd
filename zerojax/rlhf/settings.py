"""The `"zerojax": {"rlhf": {...}}` section, checked for the algorithm being run.

Keys and defaults are DESIGN.md's table (Wave 2, RLHF config). A key of another algorithm
is an error naming the algorithms it belongs to, so a DPO config run as SFT never trains
with a silently ignored `beta`.
"""
from __future__ import annotations

from typing import Any, Mapping

from zerojax.config import _bool, _choice, _int, _num, _optional, _section, _str
from zerojax.config import ConfigError
from zerojax.rlhf.losses import DPO_LOSS_TYPES

_COMMON = {"data": (_optional(_str), None), "max_prompt_len": (_int(1), 256), "max_len": (_int(2), 512)}
SCHEMAS = {
    "sft": dict(_COMMON),
    "reward": dict(_COMMON),
    "dpo": {**_COMMON, "beta": (_num(0.0, lo_open=True), 0.1),
            "loss_type": (_choice(*DPO_LOSS_TYPES), "sigmoid"),
            "label_smoothing": (_num(0.0, 0.5), 0.0), "ref_from": (_optional(_str), None),
            "precompute_ref": (_bool, False)},
}


def settings(raw: Mapping[str, Any] | None, algorithm: str) -> dict[str, Any]:
    """The checked `rlhf` section of `algorithm` with every default filled in."""
    if algorithm not in SCHEMAS:
        raise ConfigError(f"unknown RLHF algorithm {algorithm!r}; choose one of {', '.join(SCHEMAS)}")
    raw = dict(raw or {})
    for key in raw:
        owners = [name for name, schema in SCHEMAS.items() if key in schema]
        if owners and key not in SCHEMAS[algorithm]:
            raise ConfigError(f"zerojax.rlhf.{key} does not apply to {algorithm} (it is a {'/'.join(owners)} "
                              f"setting); remove it or run {owners[0]}")
    out = _section(raw, "zerojax.rlhf", SCHEMAS[algorithm])
    if out["max_prompt_len"] >= out["max_len"]:
        raise ConfigError(f"zerojax.rlhf: max_prompt_len ({out['max_prompt_len']}) must be below max_len "
                          f"({out['max_len']}), which holds prompt and response")
    return out
