"""The `"zerojax": {"rlhf": {...}}` section, checked for the algorithm being run.

Keys and defaults are DESIGN.md's table (Wave 2, RLHF config). A key of another algorithm
is an error naming the algorithms it belongs to, so a DPO config run as SFT never trains
with a silently ignored `beta`.

The online algorithms (ppo, grpo) add what a rollout needs: `max_new_tokens`,
`temperature`, `top_p`, `stop` (strings that end a completion), `rollout_tensor_parallel`
(the generation layout: 1 = every device group generates on one device, see
`rollout.py`), and the rewards: `reward_fn` (`"file.py:name"` or a list of them, with
`reward_weights`) or `reward_model` (a reward run's output directory).
"""
from __future__ import annotations

from typing import Any, Mapping

from zerojax.config import _bool, _choice, _free_dict, _int, _num, _optional, _section, _str
from zerojax.config import ConfigError, _fail
from zerojax.rlhf.losses import DPO_LOSS_TYPES, GRPO_LOSS_TYPES, KL_ESTIMATORS, SCALE_REWARDS

CRITIC_KEYS = ("init_from", "optimizer", "zero_optimization", "scheduler")


def _str_or_list(value, path):
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise _fail(path, 'a "file.py:function" string or a non-empty list of them', value)


def _numbers(value, path):
    if isinstance(value, list) and value and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                 for v in value):
        return [float(v) for v in value]
    raise _fail(path, "a non-empty list of numbers", value)


def _strings(value, path):
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list) and all(isinstance(v, str) and v for v in value):
        return list(value)
    raise _fail(path, "a list of non-empty strings", value)


def _critic(value, path):
    out = _free_dict(value, path)
    unknown = sorted(set(out) - set(CRITIC_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}; the critic takes {', '.join(CRITIC_KEYS)}")
    return out


_COMMON = {"data": (_optional(_str), None), "max_prompt_len": (_int(1), 256), "max_len": (_int(2), 512)}
_ONLINE = {"data": (_optional(_str), None), "max_prompt_len": (_int(1), 256), "max_new_tokens": (_int(1), 128),
           "temperature": (_num(0.0, lo_open=True), 1.0), "top_p": (_num(0.0, 1.0, lo_open=True), 1.0),
           "stop": (_strings, []), "rollout_tensor_parallel": (_int(1), 1),
           "reward_fn": (_optional(_str_or_list), None), "reward_weights": (_optional(_numbers), None),
           "reward_model": (_optional(_str), None)}
SCHEMAS = {
    "sft": dict(_COMMON),
    "reward": dict(_COMMON),
    "dpo": {**_COMMON, "beta": (_num(0.0, lo_open=True), 0.1),
            "loss_type": (_choice(*DPO_LOSS_TYPES), "sigmoid"),
            "label_smoothing": (_num(0.0, 0.5), 0.0), "ref_from": (_optional(_str), None),
            "precompute_ref": (_bool, False)},
    "ppo": {**_ONLINE, "kl_coef": (_num(0.0), 0.1), "kl_estimator": (_choice(*KL_ESTIMATORS), "k1"),
            "cliprange": (_num(0.0, lo_open=True), 0.2), "cliprange_value": (_num(0.0, lo_open=True), 0.2),
            "vf_coef": (_num(0.0, lo_open=True), 0.1), "gamma": (_num(0.0, 1.0), 1.0), "lam": (_num(0.0, 1.0), 0.95),
            "ppo_epochs": (_int(1), 1), "mini_batches": (_int(1), 1), "reward_clip": (_num(0.0, lo_open=True), 5.0),
            "whiten_rewards": (_bool, False), "ema": (_optional(_num(0.0, 1.0, lo_open=True, hi_open=True)), None),
            "critic": (_critic, {})},
    "grpo": {**_ONLINE, "num_generations": (_int(2), 8), "beta": (_num(0.0), 0.0),
             "loss_type": (_choice(*GRPO_LOSS_TYPES), "dapo"), "epsilon": (_num(0.0, lo_open=True), 0.2),
             "epsilon_high": (_optional(_num(0.0, lo_open=True)), None),
             "scale_rewards": (_choice(*SCALE_REWARDS), "group")},
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
    if "max_len" in out and out["max_prompt_len"] >= out["max_len"]:
        raise ConfigError(f"zerojax.rlhf: max_prompt_len ({out['max_prompt_len']}) must be below max_len "
                          f"({out['max_len']}), which holds prompt and response")
    if "reward_fn" in out:
        _check_rewards(out)
    return out


def _check_rewards(out: dict) -> None:
    fns, weights = out["reward_fn"], out["reward_weights"]
    if weights is not None and (fns is None or len(weights) != len(fns)):
        raise ConfigError(f"zerojax.rlhf.reward_weights has {len(weights)} weights for "
                          f"{len(fns or [])} reward_fn(s); give one weight per function")
    if fns and out["reward_model"]:
        raise ConfigError("zerojax.rlhf: set reward_fn or reward_model, not both")
