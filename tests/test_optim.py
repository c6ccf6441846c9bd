"""zerojax.optim against DeepSpeed's / torch's formulas, written out here as numpy oracles."""
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from zerojax import optim
from zerojax.config import Config, ConfigError


def config(scheduler=None, optimizer=None) -> Config:
    raw = {"train_batch_size": 8}
    if optimizer is not None:
        raw["optimizer"] = optimizer
    if scheduler is not None:
        raw["scheduler"] = scheduler
    return Config.load(raw)


def lrs(schedule, n):
    return [float(schedule(jnp.int32(i))) for i in range(n)]


ADAM_1E3 = {"type": "Adam", "params": {"lr": 1e-3}}

# --- schedules: lr applied by update number 0, 1, 2, ... -----------------------------------


def test_warmup_lr_log_matches_deepspeed_observation():
    schedule = optim.lr_schedule(config({"type": "WarmupLR", "params": {
        "warmup_min_lr": 1e-5, "warmup_max_lr": 1e-3, "warmup_num_steps": 10}}, ADAM_1E3))
    got = lrs(schedule, 14)
    # Observed with deepspeed 0.19.8 (rounded to 3 digits there).
    assert got[:5] == pytest.approx([1e-5, 1e-5, 3.08e-4, 4.82e-4, 6.06e-4], rel=2e-3)
    # DeepSpeed: lr(count) = min + (max - min) * ln(last + 1) / ln(10), last = count - 1.
    exact = [1e-5] + [1e-5 + 0.99e-3 * math.log(k) / math.log(10) for k in range(1, 11)] + [1e-3] * 3
    assert got == pytest.approx(exact, rel=1e-5)


def test_warmup_lr_linear_matches_deepspeed_observation():
    schedule = optim.lr_schedule(config({"type": "WarmupLR", "params": {
        "warmup_min_lr": 0.0, "warmup_max_lr": 1e-3, "warmup_num_steps": 10, "warmup_type": "linear"}},
        ADAM_1E3))
    assert lrs(schedule, 13) == pytest.approx(
        [0.0, 0.0, 1e-4, 2e-4, 3e-4, 4e-4, 5e-4, 6e-4, 7e-4, 8e-4, 9e-4, 1e-3, 1e-3], abs=1e-10)


def test_warmup_lr_max_defaults_to_optimizer_lr_and_min_steps_is_two():
    schedule = optim.lr_schedule(config({"type": "WarmupLR", "params": {
        "warmup_num_steps": 1, "warmup_type": "linear"}}, {"type": "SGD", "params": {"lr": 0.5}}))
    # warmup_num_steps is raised to 2: 0, 0, 0.25, then 0.5.
    assert lrs(schedule, 5) == pytest.approx([0.0, 0.0, 0.25, 0.5, 0.5])


def test_warmup_decay_lr():
    schedule = optim.lr_schedule(config({"type": "WarmupDecayLR", "params": {
        "total_num_steps": 10, "warmup_min_lr": 0.0, "warmup_max_lr": 0.01, "warmup_num_steps": 4,
        "warmup_type": "linear"}}, ADAM_1E3))
    # warm-up last/4, then (10 - last) / (10 - 4), floored at 0.
    expected = [0, 0, 0.0025, 0.005, 0.0075, 0.01, 0.01 * 5 / 6, 0.01 * 4 / 6, 0.01 * 3 / 6, 0.01 * 2 / 6,
                0.01 * 1 / 6, 0.0, 0.0]
    assert lrs(schedule, 13) == pytest.approx(expected, abs=1e-9)


def test_warmup_decay_lr_max_default_is_deepspeeds_0_001():
    schedule = optim.lr_schedule(config(
        {"type": "WarmupDecayLR", "params": {"total_num_steps": 10, "warmup_num_steps": 2, "warmup_type": "linear"}},
        {"type": "SGD", "params": {"lr": 0.5}}))
    assert float(schedule(jnp.int32(3))) == pytest.approx(0.001)


def test_warmup_cosine_lr():
    schedule = optim.lr_schedule(config({"type": "WarmupCosineLR", "params": {
        "total_num_steps": 10, "warmup_num_steps": 4, "warmup_min_ratio": 0.1, "cos_min_ratio": 0.01,
        "warmup_type": "linear"}}, {"type": "AdamW", "params": {"lr": 0.1}}))

    def cosine(real_last):      # real_last = last - warmup + 1, over total - warmup = 6
        return 0.1 * (0.01 + 0.99 * (1 + math.cos(math.pi * min(1.0, real_last / 6))) / 2)
    expected = [0.0,                                   # DeepSpeed's constructor sets 0.0
                0.1 * 0.1, 0.1 * 0.325, 0.1 * 0.55, 0.1 * 0.775,
                cosine(1), cosine(2), cosine(3), cosine(4), cosine(5), cosine(6), cosine(7), cosine(8)]
    assert lrs(schedule, 13) == pytest.approx(expected, rel=1e-5, abs=1e-9)
    assert expected[-1] == pytest.approx(0.1 * 0.01)


def test_warmup_cosine_lr_log_warmup():
    schedule = optim.lr_schedule(config({"type": "WarmupCosineLR", "params": {
        "total_num_steps": 100, "warmup_num_steps": 10}}, {"type": "AdamW", "params": {"lr": 2e-3}}))
    expected = [0.0, 0.0] + [2e-3 * math.log(k) / math.log(10) for k in range(2, 11)]
    assert lrs(schedule, 11) == pytest.approx(expected, rel=1e-5, abs=1e-10)


ONE_CYCLE = {"cycle_min_lr": 0.1, "cycle_max_lr": 1.0, "cycle_first_step_size": 4, "cycle_second_step_size": 2,
             "decay_step_size": 2, "decay_lr_rate": 0.5, "cycle_min_mom": 0.8, "cycle_max_mom": 0.9,
             "decay_mom_rate": 0.1}


def test_one_cycle_lr_and_momentum_with_decay():
    c = config({"type": "OneCycle", "params": ONE_CYCLE}, ADAM_1E3)
    # Up 4 steps, down 2 (cycle of 6), then lr = min / (1 + 0.5 * k / 2), mom = max * (1 + 0.1 * k / 2).
    assert lrs(optim.lr_schedule(c), 10) == pytest.approx(
        [0.1, 0.325, 0.55, 0.775, 1.0, 0.55, 0.1, 0.1 / 1.25, 0.1 / 1.5, 0.1 / 1.75], rel=1e-6)
    # The constructor sets beta1 = cycle_min_mom for the first step; then max - (max - min) * scale.
    assert lrs(optim.momentum_schedule(c), 10) == pytest.approx(
        [0.8, 0.875, 0.85, 0.825, 0.8, 0.85, 0.9, 0.9 * 1.05, 0.9 * 1.1, 0.9 * 1.15], rel=1e-6)


def test_one_cycle_without_decay_stays_at_min():
    c = config({"type": "OneCycle", "params": {**ONE_CYCLE, "decay_step_size": 0}}, ADAM_1E3)
    assert lrs(optim.lr_schedule(c), 12)[6:] == pytest.approx([0.1] * 6)
    assert lrs(optim.momentum_schedule(c), 12)[6:] == pytest.approx([0.9] * 6)


def test_one_cycle_stairs():
    c = config({"type": "OneCycle", "params": {"cycle_min_lr": 0.1, "cycle_max_lr": 1.0,
                                               "cycle_first_step_size": 4, "cycle_first_stair_count": 2}},
               ADAM_1E3)
    # 2 stairs per half: scale = floor(position * 2 / 4) / 2 going up, mirrored coming down.
    scale = [0, 0, 0.5, 0.5, 1, 0.5, 0.5, 0, 0]
    assert lrs(optim.lr_schedule(c), 9) == pytest.approx([0.1 + 0.9 * s for s in scale], rel=1e-6)


def test_lr_range_test_continuous_and_staircase():
    base = {"lr_range_test_min_lr": 0.01, "lr_range_test_step_size": 3, "lr_range_test_step_rate": 2.0}
    continuous = optim.lr_schedule(config({"type": "LRRangeTest", "params": base}, ADAM_1E3))
    assert lrs(continuous, 7) == pytest.approx([0.01 * (1 + 2 * k / 3) for k in range(7)], rel=1e-6)
    staircase = optim.lr_schedule(config({"type": "LRRangeTest",
                                          "params": {**base, "lr_range_test_staircase": True}}, ADAM_1E3))
    assert lrs(staircase, 7) == pytest.approx([0.01, 0.01, 0.01, 0.03, 0.03, 0.03, 0.05], rel=1e-6)


def test_no_scheduler_is_constant_and_schedules_trace_under_jit():
    assert lrs(optim.lr_schedule(config(optimizer={"type": "Lion", "params": {"lr": 3e-4}})), 3) == \
        pytest.approx([3e-4] * 3)
    schedule = optim.lr_schedule(config({"type": "WarmupLR", "params": {"warmup_num_steps": 10}}, ADAM_1E3))
    assert float(jax.jit(schedule)(jnp.int32(5))) == pytest.approx(float(schedule(5)))


def test_momentum_schedule_only_for_betas_optimizers():
    one_cycle = {"type": "OneCycle", "params": ONE_CYCLE}
    assert optim.momentum_schedule(config(one_cycle, {"type": "SGD", "params": {"momentum": 0.9}})) is None
    assert optim.momentum_schedule(config({"type": "OneCycle", "params": {**ONE_CYCLE, "cycle_momentum": False}},
                                          ADAM_1E3)) is None
    assert optim.momentum_schedule(config({"type": "WarmupLR"}, ADAM_1E3)) is None


# --- optimizers: first 3 updates against numpy oracles ---------------------------------------

RNG = np.random.default_rng(0)
PARAMS = {"w": RNG.normal(size=(3, 4)).astype(np.float32), "b": RNG.normal(size=(4,)).astype(np.float32)}
GRADS = [{k: RNG.normal(size=v.shape).astype(np.float32) for k, v in PARAMS.items()} for _ in range(3)]


def run_optax(tx, params=PARAMS, grads=GRADS):
    params = jax.tree.map(jnp.asarray, params)
    state = tx.init(params)
    history = []
    for g in grads:
        updates, state = tx.update(jax.tree.map(jnp.asarray, g), state, params)
        params = optax.apply_updates(params, updates)
        history.append(jax.tree.map(np.asarray, params))
    return history, state


def run_oracle(step_fn, params=PARAMS, grads=GRADS):
    """step_fn(name, p, g, state_dict, t) -> new p, with t = 1, 2, 3 (float64 numpy)."""
    params = {k: v.astype(np.float64) for k, v in params.items()}
    states = {k: {} for k in params}
    history = []
    for t, g in enumerate(grads, start=1):
        params = {k: step_fn(k, params[k], g[k].astype(np.float64), states[k], t) for k in params}
        history.append(dict(params))
    return history


def assert_histories_close(got, expected, rtol=2e-5, atol=1e-6):
    for step, (a, b) in enumerate(zip(got, expected)):
        for k in b:
            np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=atol, err_msg=f"step {step} leaf {k}")


def fused_adam(lr, b1, b2, eps, wd, adam_w_mode, bias_correction=True, mask=None):
    """DeepSpeed FusedAdam (csrc/adam/multi_tensor_adam.cu) for one tensor."""
    def step(name, p, g, s, t):
        decay = wd if (mask is None or mask[name]) else 0.0
        if not adam_w_mode:
            g = g + decay * p                                 # mode 0: L2
        s["m"] = b1 * s.get("m", 0) + (1 - b1) * g
        s["v"] = b2 * s.get("v", 0) + (1 - b2) * g * g
        bc1, bc2 = (1 - b1 ** t, 1 - b2 ** t) if bias_correction else (1, 1)
        update = (s["m"] / bc1) / (np.sqrt(s["v"] / bc2) + eps)
        if adam_w_mode:
            update = update + decay * p                       # mode 1: decoupled
        return p - lr * update
    return step


@pytest.mark.parametrize("opt_type, adam_w_mode", [("Adam", True), ("Adam", False), ("AdamW", False)])
def test_adam_modes_with_weight_decay(opt_type, adam_w_mode):
    params = {"lr": 0.01, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.1, "adam_w_mode": adam_w_mode}
    tx = optim.build_optimizer(config(optimizer={"type": opt_type, "params": params}))
    got, _ = run_optax(tx)
    w_mode = adam_w_mode or opt_type == "AdamW"
    assert_histories_close(got, run_oracle(fused_adam(0.01, 0.9, 0.999, 1e-8, 0.1, w_mode)))


def test_adam_without_bias_correction():
    params = {"lr": 0.01, "weight_decay": 0.0, "bias_correction": False}
    tx = optim.build_optimizer(config(optimizer={"type": "Adam", "params": params}))
    got, _ = run_optax(tx)
    assert_histories_close(got, run_oracle(fused_adam(0.01, 0.9, 0.999, 1e-8, 0.0, True, bias_correction=False)))


def test_adam_w_and_l2_modes_differ():
    results = []
    for mode in (True, False):
        tx = optim.build_optimizer(config(optimizer={"type": "Adam", "params": {
            "lr": 0.01, "weight_decay": 0.5, "adam_w_mode": mode}}))
        results.append(run_optax(tx)[0][-1]["w"])
    assert np.abs(results[0] - results[1]).max() > 1e-4


@pytest.mark.parametrize("mask_kind", ["tree", "callable"])
def test_decay_mask_respected(mask_kind):
    mask = {"w": True, "b": False}
    decay_mask = mask if mask_kind == "tree" else (lambda params: {"w": True, "b": False})
    tx = optim.build_optimizer(config(optimizer={"type": "AdamW", "params": {"lr": 0.01, "weight_decay": 0.3}}),
                               decay_mask=decay_mask)
    got, _ = run_optax(tx)
    assert_histories_close(got, run_oracle(fused_adam(0.01, 0.9, 0.999, 1e-8, 0.3, True, mask=mask)))


def torch_sgd(lr, momentum, dampening, wd, nesterov):
    """torch.optim.SGD for one tensor."""
    def step(name, p, g, s, t):
        g = g + wd * p
        if momentum:
            s["buf"] = g.copy() if t == 1 else momentum * s["buf"] + (1 - dampening) * g
            g = g + momentum * s["buf"] if nesterov else s["buf"]
        return p - lr * g
    return step


@pytest.mark.parametrize("momentum, dampening, nesterov, wd", [
    (0.0, 0.0, False, 0.0), (0.9, 0.0, False, 0.01), (0.9, 0.0, True, 0.01), (0.9, 0.5, False, 0.0)])
def test_sgd_torch_semantics(momentum, dampening, nesterov, wd):
    params = {"lr": 0.1, "momentum": momentum, "dampening": dampening, "nesterov": nesterov, "weight_decay": wd}
    tx = optim.build_optimizer(config(optimizer={"type": "SGD", "params": params}))
    got, _ = run_optax(tx)
    assert_histories_close(got, run_oracle(torch_sgd(0.1, momentum, dampening, wd, nesterov)))


def fused_lamb(lr, b1, b2, eps, wd, min_coeff, max_coeff):
    """DeepSpeed FusedLamb (csrc/lamb/fused_lamb_cuda_kernel.cu) for one tensor."""
    def step(name, p, g, s, t):
        s["m"] = b1 * s.get("m", 0) + (1 - b1) * g
        s["v"] = b2 * s.get("v", 0) + (1 - b2) * g * g
        update = (s["m"] / (1 - b1 ** t)) / (np.sqrt(s["v"] / (1 - b2 ** t)) + eps) + wd * p
        w_norm, u_norm = np.linalg.norm(p), np.linalg.norm(update)
        coeff = 1.0
        if w_norm != 0 and u_norm != 0:
            coeff = min(max(w_norm / u_norm, min_coeff), max_coeff)
        s.setdefault("coeffs", []).append(coeff)
        return p - lr * coeff * update
    return step


def test_lamb_trust_ratio_is_clamped():
    # |w| is large and |b| tiny against |update| ~ sqrt(n): both clamps are hit.
    params = {"w": PARAMS["w"] * 30.0, "b": PARAMS["b"] * 1e-3}
    cfg = {"lr": 0.01, "weight_decay": 0.01, "min_coeff": 0.05, "max_coeff": 2.0}
    tx = optim.build_optimizer(config(optimizer={"type": "Lamb", "params": cfg}))
    got, _ = run_optax(tx, params=params)
    oracle = fused_lamb(0.01, 0.9, 0.999, 1e-8, 0.01, 0.05, 2.0)
    expected = run_oracle(oracle, params=params)
    assert_histories_close(got, expected)


def test_lamb_unclamped_ratio():
    cfg = {"lr": 0.01, "weight_decay": 0.0, "min_coeff": 0.01, "max_coeff": 10.0}
    tx = optim.build_optimizer(config(optimizer={"type": "Lamb", "params": cfg}))
    got, _ = run_optax(tx)
    assert_histories_close(got, run_oracle(fused_lamb(0.01, 0.9, 0.999, 1e-8, 0.0, 0.01, 10.0)))


def lion(lr, b1, b2, wd):
    def step(name, p, g, s, t):
        m = s.get("m", np.zeros_like(p))
        c = b1 * m + (1 - b1) * g
        s["m"] = b2 * m + (1 - b2) * g
        return p * (1 - lr * wd) - lr * np.sign(c)
    return step


def test_lion():
    tx = optim.build_optimizer(config(optimizer={"type": "Lion", "params": {
        "lr": 1e-3, "betas": [0.9, 0.99], "weight_decay": 0.1}}))
    got, _ = run_optax(tx)
    assert_histories_close(got, run_oracle(lion(1e-3, 0.9, 0.99, 0.1)))


def torch_adagrad(lr, eps, wd, lr_decay=0.0):
    def step(name, p, g, s, t):
        g = g + wd * p
        s["sum"] = s.get("sum", 0) + g * g
        clr = lr / (1 + (t - 1) * lr_decay)
        return p - clr * g / (np.sqrt(s["sum"]) + eps)
    return step


@pytest.mark.parametrize("lr_decay", [0.0, 0.5])
def test_adagrad_torch_semantics(lr_decay):
    tx = optim.build_optimizer(config(optimizer={"type": "Adagrad", "params": {
        "lr": 0.1, "weight_decay": 0.01, "lr_decay": lr_decay}}))
    got, _ = run_optax(tx)
    assert_histories_close(got, run_oracle(torch_adagrad(0.1, 1e-10, 0.01, lr_decay)))


# --- schedules drive the optimizers ---------------------------------------------------------


def test_scheduler_drives_lr_and_skipped_updates_do_not_advance():
    tx = optim.build_optimizer(config({"type": "WarmupLR", "params": {
        "warmup_min_lr": 0.0, "warmup_max_lr": 1.0, "warmup_num_steps": 4, "warmup_type": "linear"}},
        {"type": "SGD", "params": {"lr": 1.0}}))
    params = {"x": jnp.zeros(())}
    grad = {"x": jnp.ones(())}
    state = tx.init(params)
    applied = []
    for step in range(6):
        updates, new_state = tx.update(grad, state, params)
        applied.append(-float(updates["x"]))
        assert float(new_state.hyperparams["learning_rate"]) == pytest.approx(applied[-1])
        if step != 3:                  # step 3 is "skipped": its new state is thrown away
            state = new_state
    assert applied == pytest.approx([0.0, 0.0, 0.25, 0.5, 0.5, 0.75])


def test_one_cycle_drives_adam_beta1_and_sets_beta2():
    c = config({"type": "OneCycle", "params": ONE_CYCLE}, {"type": "Adam", "params": {"lr": 1.0}})
    tx = optim.build_optimizer(c)
    got, state = run_optax(tx)
    assert float(state.hyperparams["b2"]) == pytest.approx(0.99)
    lr_seq, b1_seq = [0.1, 0.325, 0.55], [0.8, 0.875, 0.85]

    def adam_varying(name, p, g, s, t):
        lr, b1, b2 = lr_seq[t - 1], b1_seq[t - 1], 0.99
        s["m"] = b1 * s.get("m", 0) + (1 - b1) * g
        s["v"] = b2 * s.get("v", 0) + (1 - b2) * g * g
        return p - lr * (s["m"] / (1 - b1 ** t)) / (np.sqrt(s["v"] / (1 - b2 ** t)) + 1e-8)
    assert_histories_close(got, run_oracle(adam_varying))


def test_one_cycle_momentum_on_sgd_warns_and_is_not_cycled():
    c = config({"type": "OneCycle", "params": ONE_CYCLE}, {"type": "SGD", "params": {"momentum": 0.9}})
    with pytest.warns(UserWarning, match="cycle_momentum"):
        tx = optim.build_optimizer(c)
    assert "b1" not in tx.init(PARAMS).hyperparams


def test_optimizer_state_maps_onto_params():
    """The ZeRO layout finds param-shaped optimizer leaves with optax.tree_map_params."""
    for opt in ({"type": "AdamW", "params": {"weight_decay": 0.1}}, {"type": "SGD", "params": {"momentum": 0.9}},
                {"type": "Lamb"}, {"type": "Lion"}, {"type": "Adagrad"}):
        tx = optim.build_optimizer(config({"type": "WarmupLR"}, opt), decay_mask={"w": True, "b": False})
        abstract = jax.eval_shape(tx.init, PARAMS)
        mapped = optax.tree_map_params(tx, lambda leaf: "param", abstract,
                                       transform_non_params=lambda leaf: "other")
        labels = jax.tree.leaves(mapped)
        assert labels.count("param") >= 2 and "other" in labels, opt["type"]


# --- a user's optimizer ----------------------------------------------------------------------


def test_user_inject_hyperparams_optimizer_is_driven_by_scheduler():
    user = optax.inject_hyperparams(optax.sgd)(learning_rate=0.5)
    c = config({"type": "WarmupLR", "params": {"warmup_num_steps": 4, "warmup_type": "linear"}},
               {"type": "Adam", "params": {"lr": 123.0}})       # replaced by the user's optimizer
    tx = optim.build_optimizer(c, optimizer=user)
    params, grad = {"x": jnp.zeros(())}, {"x": jnp.ones(())}
    state = tx.init(params)
    applied = []
    for _ in range(5):
        updates, state = tx.update(grad, state, params)
        applied.append(-float(updates["x"]))
    expected = [0.0, 0.0, 0.125, 0.25, 0.375]      # warmup_max_lr defaults to the user's lr 0.5
    assert applied == pytest.approx(expected)
    assert lrs(optim.lr_schedule(c, optimizer=user), 5) == pytest.approx(expected)


def test_user_optimizer_without_scheduler_is_used_as_is():
    user = optax.adam(1e-3)
    assert optim.build_optimizer(config(), optimizer=user) is user
    assert lrs(optim.lr_schedule(config(), optimizer=optax.inject_hyperparams(optax.adam)(learning_rate=0.2)), 2) \
        == pytest.approx([0.2, 0.2])


def test_user_optimizer_that_cannot_be_driven_warns():
    user = optax.sgd(0.1)
    with pytest.warns(UserWarning, match="not applied"):
        tx = optim.build_optimizer(config({"type": "WarmupLR"}), optimizer=user)
    assert tx is user
    assert math.isnan(float(optim.lr_schedule(config({"type": "WarmupLR"}), optimizer=user)(0)))


def test_no_optimizer_anywhere():
    with pytest.raises(ConfigError, match="no optimizer: add an 'optimizer' section"):
        optim.build_optimizer(config())
    with pytest.raises(ConfigError, match="warmup_max_lr"):
        optim.lr_schedule(config({"type": "WarmupLR"}))


def test_build_does_not_warn_for_plain_configs():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optim.build_optimizer(config({"type": "WarmupCosineLR", "params": {"total_num_steps": 5000}}, ADAM_1E3))
