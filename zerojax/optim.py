"""DeepSpeed optimizer and scheduler names -> optax, with DeepSpeed's exact numbers.

Learning-rate sequence. DeepSpeed's schedulers set the optimizer's lr when they are built
(``last_batch_iteration = -1``) and the engine calls ``scheduler.step()`` after every
applied optimizer step. So the lr used by update number ``count`` (0 for the first) is
``get_lr()`` evaluated at ``last_batch_iteration = count - 1``, where iteration -1 means
"the value the constructor set": the min lr for WarmupLR / WarmupDecayLR / OneCycle /
LRRangeTest and 0 for WarmupCosineLR. Every schedule here is a jnp-traceable function of
``count`` reproducing that sequence.

The optimizers are built with ``optax.inject_hyperparams`` so the lr (and beta1 under
OneCycle's momentum cycling) follow the schedules, counted by the optimizer's own update
counter: a step whose new optimizer state is thrown away (fp16 overflow) does not advance
the schedule. After an update, ``opt_state.hyperparams["learning_rate"]`` holds the lr that
update used. Gradient clipping is not done here: the train step clips (it needs the norm).
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from zerojax.config import Config, ConfigError

Schedule = Callable[[Any], jax.Array]

# DeepSpeed cycles momentum only for optimizers whose defaults have `betas`.
_BETAS_OPTIMIZERS = ("adam", "adamw", "lamb", "lion")
# OneCycle writes (momentum, 0.99) into the optimizer's betas: beta2 becomes 0.99.
_ONECYCLE_BETA2 = 0.99


# ---------------------------------------------------------------------------------------
# schedules


def lr_schedule(config: Config, *, optimizer: optax.GradientTransformation | None = None) -> Schedule:
    """lr(count): the rate applied by optimizer update number `count` (0-based).

    `optimizer` is the user's optax transform when it replaces the config's optimizer
    section; its lr (read from ``optax.inject_hyperparams``) is then the base lr. If the
    lr cannot be known (a user optimizer that does not expose ``learning_rate``), the
    schedule returns NaN.
    """
    if optimizer is not None:
        base_lr = _probe_user_optimizer(optimizer).learning_rate
        if base_lr is None:
            return _constant(math.nan)
    else:
        base_lr = config.optimizer.params["lr"] if config.optimizer is not None else None
    scheduler = config.scheduler
    if scheduler is None:
        return _constant(math.nan if base_lr is None else base_lr)
    p = scheduler.params
    if scheduler.type in ("WarmupLR", "WarmupDecayLR"):
        max_lr = p["warmup_max_lr"] if p["warmup_max_lr"] is not None else base_lr
        if max_lr is None:
            raise ConfigError("scheduler.params.warmup_max_lr: not set and there is no optimizer lr "
                              "to default to; set warmup_max_lr or add an 'optimizer' section")
        total = p["total_num_steps"] if scheduler.type == "WarmupDecayLR" else None
        return _warmup_lr(p["warmup_min_lr"], max_lr, p["warmup_num_steps"], p["warmup_type"], total)
    if scheduler.type == "WarmupCosineLR":
        if base_lr is None:
            raise ConfigError("scheduler: WarmupCosineLR scales the optimizer's lr, but there is none; "
                              "add an 'optimizer' section with params.lr")
        return _warmup_cosine_lr(base_lr, p)
    if scheduler.type == "OneCycle":
        return _one_cycle(p)[0]
    if scheduler.type == "LRRangeTest":
        return _lr_range_test(p)
    raise ConfigError(f"scheduler.type: unknown scheduler {scheduler.type!r}")


def momentum_schedule(config: Config, *,
                      optimizer: optax.GradientTransformation | None = None) -> Schedule | None:
    """beta1(count) under OneCycle with cycle_momentum; None when momentum is not cycled.

    DeepSpeed cycles momentum only for optimizers with `betas` (Adam, AdamW, Lamb, Lion);
    for SGD and Adagrad it disables cycle_momentum with a warning, and so does zerojax.
    """
    scheduler = config.scheduler
    if scheduler is None or scheduler.type != "OneCycle" or not scheduler.params["cycle_momentum"]:
        return None
    if optimizer is None and (config.optimizer is None or config.optimizer.type not in _BETAS_OPTIMIZERS):
        return None
    return _one_cycle(scheduler.params)[1]


def _count(count) -> jax.Array:
    return jnp.asarray(count).astype(jnp.float32)


def _constant(value: float) -> Schedule:
    return lambda count: jnp.full(jnp.shape(count), value, jnp.float32)


def _warmup_gamma(step: jax.Array, num_steps: int, warmup_type: str) -> jax.Array:
    """DeepSpeed's warm-up fraction at last_batch_iteration `step` (>= 0)."""
    if warmup_type == "log":
        return jnp.log(step + 1.0) / math.log(num_steps)
    return step / num_steps


def _warmup_lr(min_lr: float, max_lr: float, warmup_num_steps: int, warmup_type: str,
               total_num_steps: int | None) -> Schedule:
    n = max(2, warmup_num_steps)                       # DeepSpeed: max(2, warmup_num_steps)

    def schedule(count):
        # The constructor's value (min lr) equals gamma(0) = 0, so iteration -1 folds into 0.
        step = jnp.maximum(_count(count) - 1.0, 0.0)
        if total_num_steps is None:
            after = jnp.ones_like(step)
        else:
            after = jnp.maximum(0.0, (total_num_steps - step) / max(1.0, total_num_steps - n))
        gamma = jnp.where(step < n, _warmup_gamma(step, n, warmup_type), after)
        return min_lr + (max_lr - min_lr) * gamma
    return schedule


def _warmup_cosine_lr(base_lr: float, p: dict[str, Any]) -> Schedule:
    n = max(2, p["warmup_num_steps"])
    total, min_ratio, cos_min = p["total_num_steps"], p["warmup_min_ratio"], p["cos_min_ratio"]

    def schedule(count):
        last = _count(count) - 1.0
        step = jnp.maximum(last, 0.0)
        warm = min_ratio + _warmup_gamma(step, n, p["warmup_type"]) * (1.0 - min_ratio)
        progress = jnp.minimum(1.0, (step - n + 1.0) / max(1, total - n))
        cosine = jnp.maximum(0.0, cos_min + (1.0 - cos_min) * (1.0 + jnp.cos(math.pi * progress)) / 2.0)
        # last < 0: DeepSpeed's constructor sets the lr to 0.0 for the very first step.
        ratio = jnp.where(last < 0, 0.0, jnp.where(step < n, warm, cosine))
        return base_lr * ratio
    return schedule


def _one_cycle(p: dict[str, Any]) -> tuple[Schedule, Schedule]:
    first = float(p["cycle_first_step_size"])
    second = float(p["cycle_second_step_size"])
    total = first + second
    first_stairs, second_stairs = p["cycle_first_stair_count"], p["cycle_second_stair_count"]
    decay_steps = p["decay_step_size"]
    skip_lr_decay = decay_steps == 0 or p["decay_lr_rate"] == 0
    skip_mom_decay = decay_steps == 0 or p["decay_mom_rate"] == 0
    min_lr, max_lr = p["cycle_min_lr"], p["cycle_max_lr"]
    min_mom, max_mom = p["cycle_min_mom"], p["cycle_max_mom"]

    def scale_factor(batch_iteration):
        # DeepSpeed: x = frac(bi / total); up while x <= first / total. Written with the
        # position inside the cycle, which is the same quantity without the float detour.
        pos = jnp.mod(batch_iteration, total)
        up = pos <= first
        scale = jnp.where(up, pos / first, (total - pos) / max(second, 1.0))
        if first_stairs or second_stairs:
            stairs = jnp.where(up, float(first_stairs), float(second_stairs))
            stair_pos = jnp.where(up, pos * stairs / first, (total - pos) * stairs / max(second, 1.0))
            scale = jnp.where(stairs > 0, jnp.floor(stair_pos) / jnp.maximum(stairs, 1.0), scale)
        return scale

    def lr(count):
        c = _count(count)                              # batch_iteration = last + 1 = count
        in_cycle = c - 1.0 < total
        cycle_lr = min_lr + (max_lr - min_lr) * scale_factor(c)
        if skip_lr_decay:
            decay_lr = jnp.full_like(c, min_lr)
        else:
            decay_lr = min_lr / (1.0 + p["decay_lr_rate"] * (c - total) / decay_steps)
        return jnp.where(in_cycle, cycle_lr, decay_lr)

    def momentum(count):
        c = _count(count)
        in_cycle = c - 1.0 < total
        cycle_mom = max_mom - (max_mom - min_mom) * scale_factor(c)
        if skip_mom_decay:
            decay_mom = jnp.full_like(c, max_mom)
        else:
            decay_mom = max_mom * (1.0 + p["decay_mom_rate"] * (c - total) / decay_steps)
        # The constructor sets beta1 to cycle_min_mom, so the very first step uses it.
        return jnp.where(c < 1, min_mom, jnp.where(in_cycle, cycle_mom, decay_mom))

    return lr, momentum


def _lr_range_test(p: dict[str, Any]) -> Schedule:
    def schedule(count):
        interval = _count(count) / p["lr_range_test_step_size"]    # (last + 1) / step_size
        if p["lr_range_test_staircase"]:
            interval = jnp.floor(interval)
        return p["lr_range_test_min_lr"] * (1.0 + p["lr_range_test_step_rate"] * interval)
    return schedule


# ---------------------------------------------------------------------------------------
# small transforms with DeepSpeed / torch semantics


def _leaf_mask(mask: Any, params: Any, updates: Any) -> Any:
    if mask is None:
        return jax.tree.map(lambda _: True, updates)
    return mask(params) if callable(mask) else mask


def _decayed(g, p, keep, wd):
    if keep is True:
        return g + wd * p
    if keep is False:
        return g
    return jnp.where(keep, g + wd * p, g)


def add_weight_decay(weight_decay: float, mask: Any = None) -> optax.GradientTransformation:
    """updates += weight_decay * params, where `mask` (a bool pytree or callable) allows."""
    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("weight decay needs params: call update(grads, state, params)")
        keep = _leaf_mask(mask, params, updates)
        return jax.tree.map(lambda g, p, k: _decayed(g, p, k, weight_decay), updates, params, keep), state
    return optax.GradientTransformation(init, update)


class AdamState(NamedTuple):
    count: jax.Array
    mu: Any
    nu: Any


def _moments(updates, state, b1, b2):
    mu = jax.tree.map(lambda m, g: b1 * m + (1.0 - b1) * g, state.mu, updates)
    nu = jax.tree.map(lambda v, g: b2 * v + (1.0 - b2) * g * g, state.nu, updates)
    count = optax.safe_increment(state.count)
    return mu, nu, count


def _adam_init(params):
    return AdamState(count=jnp.zeros([], jnp.int32), mu=jax.tree.map(jnp.zeros_like, params),
                     nu=jax.tree.map(jnp.zeros_like, params))


def _corrections(count, b1, b2, bias_correction):
    if not bias_correction:
        return 1.0, 1.0
    t = count.astype(jnp.float32)
    return 1.0 - b1 ** t, 1.0 - b2 ** t


def scale_by_adam(b1, b2, eps: float, bias_correction: bool = True,
                  eps_inside_sqrt: bool = False) -> optax.GradientTransformation:
    """Adam's direction m̂ / (sqrt(v̂) + eps), as DeepSpeed's FusedAdam computes it.

    bias_correction=False uses m and v as they are (FusedAdam's option).
    """
    def update(updates, state, params=None):
        del params
        mu, nu, count = _moments(updates, state, b1, b2)
        bc1, bc2 = _corrections(count, b1, b2, bias_correction)
        out = jax.tree.map(lambda m, v: (m / bc1) / _denominator(v / bc2, eps, eps_inside_sqrt), mu, nu)
        return out, AdamState(count, mu, nu)
    return optax.GradientTransformation(_adam_init, update)


def _denominator(v_hat, eps, eps_inside_sqrt):
    return jnp.sqrt(v_hat + eps) if eps_inside_sqrt else jnp.sqrt(v_hat) + eps


def scale_by_lamb(b1, b2, eps: float, weight_decay: float, *, bias_correction: bool = True,
                  eps_inside_sqrt: bool = False, min_coeff: float = 0.01, max_coeff: float = 10.0,
                  mask: Any = None) -> optax.GradientTransformation:
    """DeepSpeed FusedLamb's direction, per tensor:

    u = m̂ / (sqrt(v̂) + eps) + weight_decay * p;  coeff = clip(|p| / |u|, min_coeff, max_coeff)
    (1 when either norm is 0);  direction = coeff * u.
    """
    def update(updates, state, params=None):
        if params is None:
            raise ValueError("Lamb needs params: call update(grads, state, params)")
        mu, nu, count = _moments(updates, state, b1, b2)
        bc1, bc2 = _corrections(count, b1, b2, bias_correction)
        keep = _leaf_mask(mask, params, updates)

        def leaf(m, v, p, k):
            u = _decayed((m / bc1) / _denominator(v / bc2, eps, eps_inside_sqrt), p, k, weight_decay)
            w_norm = jnp.sqrt(jnp.sum(jnp.square(p.astype(jnp.float32))))
            u_norm = jnp.sqrt(jnp.sum(jnp.square(u.astype(jnp.float32))))
            ok = (w_norm > 0) & (u_norm > 0)
            coeff = jnp.where(ok, jnp.clip(w_norm / jnp.where(ok, u_norm, 1.0), min_coeff, max_coeff), 1.0)
            return (coeff * u).astype(u.dtype)
        out = jax.tree.map(leaf, mu, nu, params, keep)
        return out, AdamState(count, mu, nu)
    return optax.GradientTransformation(_adam_init, update)


class MomentumState(NamedTuple):
    count: jax.Array
    buf: Any


def scale_by_torch_momentum(momentum: float, dampening: float = 0.0,
                            nesterov: bool = False) -> optax.GradientTransformation:
    """torch.optim.SGD's momentum buffer: buf = g on the first step, then
    buf = momentum * buf + (1 - dampening) * g; the direction is buf, or g + momentum * buf
    with nesterov."""
    def init(params):
        return MomentumState(jnp.zeros([], jnp.int32), jax.tree.map(jnp.zeros_like, params))

    def update(updates, state, params=None):
        del params
        first = state.count == 0
        buf = jax.tree.map(lambda b, g: jnp.where(first, g, momentum * b + (1.0 - dampening) * g),
                           state.buf, updates)
        out = jax.tree.map(lambda g, b: g + momentum * b, updates, buf) if nesterov else buf
        return out, MomentumState(optax.safe_increment(state.count), buf)
    return optax.GradientTransformation(init, update)


class AdagradState(NamedTuple):
    count: jax.Array
    sum: Any


def scale_by_torch_adagrad(eps: float, lr_decay: float = 0.0,
                           initial_accumulator_value: float = 0.0) -> optax.GradientTransformation:
    """torch.optim.Adagrad's direction: sum += g²; g / (sqrt(sum) + eps) / (1 + (t-1) lr_decay)."""
    def init(params):
        return AdagradState(jnp.zeros([], jnp.int32),
                            jax.tree.map(lambda p: jnp.full_like(p, initial_accumulator_value), params))

    def update(updates, state, params=None):
        del params
        total = jax.tree.map(lambda s, g: s + g * g, state.sum, updates)
        decay = 1.0 + state.count.astype(jnp.float32) * lr_decay
        out = jax.tree.map(lambda g, s: g / (jnp.sqrt(s) + eps) / decay, updates, total)
        return out, AdagradState(optax.safe_increment(state.count), total)
    return optax.GradientTransformation(init, update)


# ---------------------------------------------------------------------------------------
# building the optimizer


def build_optimizer(config: Config, *, decay_mask: Any = None,
                    optimizer: optax.GradientTransformation | None = None) -> optax.GradientTransformation:
    """The config's optimizer section (or the user's `optimizer`) driven by its scheduler.

    `decay_mask`: a pytree of bools shaped like the params (or a callable params -> such a
    tree) saying which params get weight decay; None decays all. A user `optimizer`
    replaces the config's optimizer section; when it was built with
    ``optax.inject_hyperparams`` and a numeric ``learning_rate``, the config's scheduler
    drives that lr; otherwise it is used as it is.
    """
    if optimizer is not None:
        return _drive_user_optimizer(config, optimizer)
    if config.optimizer is None:
        raise ConfigError('no optimizer: add an \'optimizer\' section to the config (e.g. '
                          '{"type": "AdamW", "params": {"lr": 1e-4}}) or pass optimizer= '
                          '(an optax GradientTransformation)')
    kind, p = config.optimizer.type, config.optimizer.params
    lr = lr_schedule(config)
    mom = momentum_schedule(config)
    if (config.scheduler is not None and config.scheduler.type == "OneCycle"
            and config.scheduler.params["cycle_momentum"] and mom is None):
        warnings.warn(f"scheduler.params.cycle_momentum: {kind} has no betas, so momentum is not "
                      "cycled (DeepSpeed disables it for such optimizers too)", UserWarning, stacklevel=2)
    wd = p.get("weight_decay", 0.0)

    def decay() -> list[optax.GradientTransformation]:
        return [add_weight_decay(wd, decay_mask)] if wd else []

    if kind in _BETAS_OPTIMIZERS:
        b1 = mom if mom is not None else p["betas"][0]
        b2 = _ONECYCLE_BETA2 if mom is not None else p["betas"][1]
        if kind in ("adam", "adamw"):
            def factory(learning_rate, b1, b2):
                direction = scale_by_adam(b1, b2, p["eps"], p["bias_correction"])
                parts = [direction, *decay()] if p["adam_w_mode"] else [*decay(), direction]
                return optax.chain(*parts, optax.scale_by_learning_rate(learning_rate))
        elif kind == "lamb":
            def factory(learning_rate, b1, b2):
                return optax.chain(
                    scale_by_lamb(b1, b2, p["eps"], wd, bias_correction=p["bias_correction"],
                                  eps_inside_sqrt=p["eps_inside_sqrt"], min_coeff=p["min_coeff"],
                                  max_coeff=p["max_coeff"], mask=decay_mask),
                    optax.scale_by_learning_rate(learning_rate))
        else:
            def factory(learning_rate, b1, b2):
                return optax.chain(optax.scale_by_lion(b1, b2), *decay(),
                                   optax.scale_by_learning_rate(learning_rate))
        return optax.inject_hyperparams(factory, hyperparam_dtype=jnp.float32)(
            learning_rate=lr, b1=b1, b2=b2)

    if kind == "sgd":
        def factory(learning_rate):
            momentum = ([scale_by_torch_momentum(p["momentum"], p["dampening"], p["nesterov"])]
                        if p["momentum"] else [])
            return optax.chain(*decay(), *momentum, optax.scale_by_learning_rate(learning_rate))
    elif kind == "adagrad":
        def factory(learning_rate):
            return optax.chain(*decay(),
                               scale_by_torch_adagrad(p["eps"], p["lr_decay"], p["initial_accumulator_value"]),
                               optax.scale_by_learning_rate(learning_rate))
    else:
        raise ConfigError(f"optimizer.type: unknown optimizer {kind!r}")
    return optax.inject_hyperparams(factory, hyperparam_dtype=jnp.float32)(learning_rate=lr)


# ---------------------------------------------------------------------------------------
# a user's optax optimizer


_INJECT_STATES = (optax.InjectStatefulHyperparamsState, optax.InjectHyperparamsState)


def _drivable(state: Any, name: str) -> bool:
    """`name` is a numeric hyperparameter of an inject_hyperparams state (not a schedule)."""
    return (name in state.hyperparams
            and name not in (getattr(state, "hyperparams_states", None) or {}))


def _inject_states(state: Any):
    if isinstance(state, _INJECT_STATES):
        yield state
    elif isinstance(state, tuple):
        for child in state:
            yield from _inject_states(child)


class _UserProbe(NamedTuple):
    learning_rate: float | None       # the user's constant lr, if exposed
    has_schedule: bool                # learning_rate is the user's own schedule


def _probe_user_optimizer(optimizer: optax.GradientTransformation) -> _UserProbe:
    """Initialise on a one-element param tree to find inject_hyperparams' learning_rate."""
    try:
        state = optimizer.init({"probe": jnp.zeros((1,), jnp.float32)})
    except Exception:          # a transform that needs its own param structure
        return _UserProbe(None, False)
    for inject in _inject_states(state):
        if _drivable(inject, "learning_rate"):
            return _UserProbe(float(inject.hyperparams["learning_rate"]), False)
        if "learning_rate" in inject.hyperparams:
            return _UserProbe(None, True)
    return _UserProbe(None, False)


def _set_hyperparams(state: Any, values: dict[str, jax.Array]) -> Any:
    if isinstance(state, _INJECT_STATES):
        new = dict(state.hyperparams)
        for name, value in values.items():
            if _drivable(state, name):
                new[name] = jnp.asarray(value, jnp.result_type(state.hyperparams[name]))
        return state._replace(hyperparams=new)
    if isinstance(state, tuple):
        children = [_set_hyperparams(child, values) for child in state]
        return type(state)(*children) if hasattr(state, "_fields") else type(state)(children)
    return state


def _drive_user_optimizer(config: Config, optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
    if config.scheduler is None:
        return optimizer
    probe = _probe_user_optimizer(optimizer)
    if probe.learning_rate is None:
        why = ("its learning_rate is a schedule of its own" if probe.has_schedule else
               "it does not expose a numeric learning_rate through optax.inject_hyperparams")
        warnings.warn(f"scheduler: the {config.scheduler.type} schedule is not applied to the optimizer "
                      f"passed as optimizer=, because {why}", UserWarning, stacklevel=3)
        return optimizer
    lr = lr_schedule(config, optimizer=optimizer)
    mom = momentum_schedule(config, optimizer=optimizer)

    def update(updates, state, params=None, **extra_args):
        count = next(_inject_states(state)).count
        values = {"learning_rate": lr(count)}
        if mom is not None:
            values.update(b1=mom(count), b2=_ONECYCLE_BETA2)
        state = _set_hyperparams(state, values)
        return optax.with_extra_args_support(optimizer).update(updates, state, params, **extra_args)
    return optax.GradientTransformationExtraArgs(optimizer.init, update)


def freeze(tx: optax.GradientTransformation, frozen: tuple[str, ...]) -> optax.GradientTransformation:
    """`tx` over every top-level param subtree except those named in `frozen`, which get
    zero updates and no optimizer state (a DPO reference, a PPO reference policy): they stay
    bitwise as they are while sharded like the rest. The state is `tx`'s over the trained
    subtrees alone (`trained_params` picks them)."""
    def init(params):
        return tx.init(trained_params(params, frozen))

    def update(updates, state, params=None):
        trained, state = tx.update(trained_params(updates, frozen), state,
                                   None if params is None else trained_params(params, frozen))
        return {k: trained[k] if k in trained else jax.tree.map(jnp.zeros_like, v) for k, v in updates.items()}, state

    return optax.GradientTransformation(init, update)


def trained_params(tree: dict, frozen: tuple[str, ...]) -> dict:
    return {k: v for k, v in tree.items() if k not in frozen}
