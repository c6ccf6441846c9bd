"""zerojax.config: DeepSpeed JSON -> typed, validated Config; batch-size resolution."""
import dataclasses
import json
import warnings

import pytest

from zerojax.config import BatchSizes, Config, ConfigError, MonitorConfig, UnsupportedKeyWarning

SEED = {"train_batch_size": 16, "gradient_accumulation_steps": 1,
        "optimizer": {"type": "Adam", "params": {"lr": 1e-5}},
        "fp16": {"enabled": True}, "zero_optimization": {"stage": 3}}


def load_quietly(raw):
    """Load, failing the test on any warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return Config.load(raw)


def error_of(raw) -> str:
    with pytest.raises(ConfigError) as info:
        Config.load(raw)
    return str(info.value)


# --- loading -------------------------------------------------------------------------


def test_seed_config_parses_verbatim():
    config = load_quietly(SEED)
    assert config.train_batch_size == 16
    assert config.gradient_accumulation_steps == 1
    assert config.train_micro_batch_size_per_gpu is None
    assert config.optimizer.type == "adam"
    assert config.optimizer.params == {"lr": 1e-5, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0,
                                       "adam_w_mode": True, "bias_correction": True, "torch_adam": False,
                                       "amsgrad": False}
    assert config.fp16.enabled and config.fp16.loss_scale == 0.0 and config.fp16.initial_scale_power == 16
    assert (config.fp16.loss_scale_window, config.fp16.hysteresis, config.fp16.min_loss_scale) == (1000, 2, 1.0)
    assert config.fp16.consecutive_hysteresis is False
    assert not config.bf16.enabled
    assert config.zero_optimization.stage == 3
    assert config.zero_optimization.stage3_param_persistence_threshold == 100_000
    assert config.gradient_clipping == 1.0
    assert config.scheduler is None and config.steps_per_print is None
    assert config.raw == SEED


def test_defaults_of_other_sections():
    config = load_quietly({})
    assert config.tensor_parallel_size == 1 and config.sequence_parallel_size == 1
    assert config.pipeline.stages == "auto" and config.pipeline.partition == "best"
    assert config.pipeline.schedule == "1f1b" and config.pipeline.activation_checkpoint_interval == 0
    assert config.activation_checkpointing.partition_activations is False
    zj = config.zerojax
    assert (zj.mesh.data, zj.mesh.sequence, zj.mesh.tensor, zj.mesh.pipe, zj.mesh.replica) == (-1, 1, 1, 1, 1)
    assert (zj.kernels, zj.remat, zj.weight_decay_mask) == ("auto", "auto", "all")
    assert zj.sequence_parallel.strategy == "ulysses"
    assert (zj.model, zj.data, zj.compilation_cache, zj.seed) == ({}, {}, None, 0)
    assert zj.train["checkpoint_every"] == 0 and zj.train["max_to_keep"] is None
    assert config.tensorboard.enabled is False and config.csv_monitor.job_name == "DeepSpeedJobName"


def test_monitor_and_train_sections():
    config = load_quietly({"tensorboard": {"enabled": True, "output_path": "tb", "job_name": "run"},
                           "csv_monitor": {"enabled": True},
                           "zerojax": {"train": {"eval_every": 50, "checkpoint_every": 100}}})
    assert config.tensorboard == MonitorConfig(True, "tb", "run") and config.csv_monitor.enabled
    assert config.zerojax.train["eval_every"] == 50
    with pytest.raises(ConfigError, match=r"zerojax\.train\.chekpoint_every'; did you mean 'zerojax\.train\.checkpoint_every'"):
        Config.load({"zerojax": {"train": {"chekpoint_every": 100}}})
    with pytest.raises(ConfigError, match=r"tensorboard\.enabled"):
        Config.load({"tensorboard": {"enabled": "yes"}})


def test_full_config_parses():
    raw = {
        "train_micro_batch_size_per_gpu": 2, "gradient_clipping": 0.5, "steps_per_print": 10,
        "bf16": {"enabled": True}, "tensor_parallel": {"autotp_size": 2}, "sequence_parallel_size": 2,
        "pipeline": {"stages": 2, "schedule": "gpipe", "activation_checkpoint_interval": 1},
        "activation_checkpointing": {"partition_activations": True, "number_checkpoints": 4},
        "zero_optimization": {"stage": 2, "overlap_comm": True, "reduce_bucket_size": 5e8,
                              "contiguous_gradients": True, "stage3_model_persistence_threshold": 10},
        "zerojax": {"mesh": {"data": 2, "tensor": 2}, "kernels": "pallas", "remat": "minimal",
                    "weight_decay_mask": "no_bias_norm", "sequence_parallel": {"strategy": "ring"},
                    "model": {"type": "llama", "hidden_size": 64}, "train": {"steps": 5},
                    "compilation_cache": "/tmp/cache", "seed": 3},
    }
    config = load_quietly(raw)
    assert config.bf16.enabled and config.gradient_clipping == 0.5 and config.steps_per_print == 10
    assert config.tensor_parallel_size == 2 and config.sequence_parallel_size == 2
    assert config.pipeline.stages == 2 and config.pipeline.schedule == "gpipe"
    assert config.activation_checkpointing.number_checkpoints == 4
    assert config.zero_optimization.stage == 2
    zj = config.zerojax
    assert zj.mesh.data == 2 and zj.mesh.tensor == 2 and zj.kernels == "pallas" and zj.remat == "minimal"
    assert zj.sequence_parallel.strategy == "ring" and zj.model["hidden_size"] == 64 and zj.seed == 3


def test_load_from_path_and_passthrough(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(SEED))
    assert Config.load(path) == Config.load(str(path)) == Config.load(SEED)
    config = Config.load(SEED)
    assert Config.load(config) is config


def test_bad_json_file_names_file_and_problem(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"train_batch_size": 16,\n "fp16": {enabled: true}}')
    message = error_of(path)
    assert "broken.json" in message and "not valid JSON" in message and "line 2" in message


def test_missing_file():
    message = error_of("/nonexistent/dir/ds_config.json")
    assert "ds_config.json" in message and "not found" in message


def test_json_must_hold_an_object(tmp_path):
    path = tmp_path / "list.json"
    path.write_text("[1, 2]")
    assert "JSON object" in error_of(path)


def test_config_is_frozen_and_hashable():
    config = Config.load(SEED)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.train_batch_size = 4
    assert hash(config) == hash(Config.load(SEED))


# --- unknown keys ----------------------------------------------------------------------


@pytest.mark.parametrize("raw, path, suggestion", [
    ({"train_batch_sise": 16}, "train_batch_sise", "train_batch_size"),
    ({"zero_optimization": {"stagee": 3}}, "zero_optimization.stagee", "zero_optimization.stage"),
    ({"fp16": {"loss_scale_windo": 10}}, "fp16.loss_scale_windo", "fp16.loss_scale_window"),
    ({"optimizer": {"type": "Adam", "params": {"weight_decy": 0.1}}},
     "optimizer.params.weight_decy", "optimizer.params.weight_decay"),
    ({"scheduler": {"type": "WarmupLR", "params": {"warmup_num_step": 5}}},
     "scheduler.params.warmup_num_step", "scheduler.params.warmup_num_steps"),
    ({"zerojax": {"mesh": {"tensr": 2}}}, "zerojax.mesh.tensr", "zerojax.mesh.tensor"),
    ({"zerojax": {"kernel": "xla"}}, "zerojax.kernel", "zerojax.kernels"),
])
def test_typo_gets_did_you_mean(raw, path, suggestion):
    message = error_of(raw)
    assert f"'{path}'" in message and f"did you mean '{suggestion}'?" in message


def test_unknown_key_without_close_match_lists_known_keys():
    message = error_of({"train_batch_size": 8, "frobnicate": 1})
    assert "unknown key 'frobnicate'" in message and "known keys:" in message
    assert "train_batch_size" in message and "zero_optimization" in message


@pytest.mark.parametrize("key, value", [
    ("wall_clock_breakdown", True),
    ("flops_profiler", {"enabled": True, "profile_step": 1}),
    ("wandb", {"enabled": True, "project": "p"}),
    ("gradient_accumulation_dtype", "fp32"),                          # close to gradient_accumulation_steps
    ("communication_data_type", "bf16"),
    ("zero_allow_untested_optimizer", True),
])
def test_unimplemented_deepspeed_key_warns_not_typo(key, value):
    if key == "zero_allow_untested_optimizer":      # a no-op for zerojax: silently accepted
        load_quietly({key: value})
        return
    with pytest.warns(UnsupportedKeyWarning, match=key):
        Config.load({"train_batch_size": 8, key: value})


def test_unimplemented_key_switched_off_is_silent():
    load_quietly({"wall_clock_breakdown": False, "flops_profiler": {"enabled": False},
                  "gradient_predivide_factor": 1.0, "prescale_gradients": False})


def test_zero_noop_keys_accepted_silently():
    load_quietly({"zero_optimization": {
        "stage": 3, "overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": 5e8,
        "allgather_bucket_size": 5e8, "reduce_scatter": True, "allgather_partitions": True,
        "stage3_prefetch_bucket_size": 5e7, "stage3_max_live_parameters": 1e9,
        "stage3_max_reuse_distance": 1e9, "stage3_gather_16bit_weights_on_model_save": True,
        "sub_group_size": 1e9, "round_robin_gradients": False, "offload_optimizer": {"device": "none"}}})


@pytest.mark.parametrize("key, value", [
    ("zero_hpz_partition_size", 8),
    ("zero_quantized_weights", True),
    ("zero_quantized_gradients", True),
    ("mics_shard_size", 4),
])
def test_zero_features_not_implemented_warn_with_path(key, value):
    with pytest.warns(UnsupportedKeyWarning, match=f"zero_optimization.{key}"):
        Config.load({"zero_optimization": {"stage": 3, key: value}})


# --- types and ranges --------------------------------------------------------------------


@pytest.mark.parametrize("raw, expected", [
    ({"zero_optimization": {"stage": "3"}}, "zero_optimization.stage: expected an integer 0-3, got '3'"),
    ({"zero_optimization": {"stage": True}}, "zero_optimization.stage: expected an integer 0-3, got True"),
    ({"zero_optimization": {"stage": 4}}, "zero_optimization.stage: expected an integer 0-3, got 4"),
    ({"train_batch_size": True}, "train_batch_size: expected an integer >= 1, got True"),
    ({"train_batch_size": 0}, "train_batch_size: expected an integer >= 1, got 0"),
    ({"train_micro_batch_size_per_gpu": 2.5}, "train_micro_batch_size_per_gpu: expected an integer >= 1"),
    ({"fp16": {"enabled": 1}}, "fp16.enabled: expected true or false, got 1"),
    ({"fp16": {"hysteresis": 0}}, "fp16.hysteresis: expected an integer >= 1, got 0"),
    ({"fp16": {"loss_scale_window": 0}}, "fp16.loss_scale_window: expected an integer >= 1"),
    ({"fp16": {"loss_scale": -1}}, "fp16.loss_scale: expected a number >= 0"),
    ({"gradient_clipping": -1.0}, "gradient_clipping: expected a number >= 0, got -1.0"),
    ({"gradient_clipping": "1.0"}, "gradient_clipping: expected a number"),
    ({"optimizer": {"type": "Adam", "params": {"lr": -1e-3}}}, "optimizer.params.lr: expected a number >= 0"),
    ({"optimizer": {"type": "Adam", "params": {"betas": [0.9]}}}, "optimizer.params.betas: expected a list"),
    ({"optimizer": {"type": "Adam", "params": {"betas": [0.9, 1.5]}}}, "optimizer.params.betas[1]"),
    ({"zero_optimization": 3}, "zero_optimization: expected an object"),
    ({"zerojax": {"remat": "everything"}}, "zerojax.remat: expected one of"),
    ({"zerojax": {"mesh": {"data": 0}}}, "zerojax.mesh.data"),
    ({"pipeline": {"schedule": "zigzag"}}, "pipeline.schedule: expected one of '1f1b', 'gpipe', 'interleaved'"),
    ({"scheduler": {"type": "WarmupLR", "params": {"warmup_type": "cubic"}}},
     "scheduler.params.warmup_type: expected one of 'log', 'linear'"),
])
def test_wrong_type_or_range_names_the_path(raw, expected):
    assert expected in error_of(raw)


def test_integral_floats_are_integers():
    config = load_quietly({"train_batch_size": 16.0, "zero_optimization": {"stage3_param_persistence_threshold": 1e4}})
    assert config.train_batch_size == 16 and isinstance(config.train_batch_size, int)
    assert config.zero_optimization.stage3_param_persistence_threshold == 10_000


@pytest.mark.parametrize("raw, path", [
    ({"train_batch_size": "auto"}, "train_batch_size"),
    ({"train_micro_batch_size_per_gpu": "auto"}, "train_micro_batch_size_per_gpu"),
    ({"gradient_accumulation_steps": "auto"}, "gradient_accumulation_steps"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": "auto"}}}, "optimizer.params.lr"),
    ({"scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": "auto"}}}, "scheduler.params.warmup_max_lr"),
])
def test_hf_auto_values_explained(raw, path):
    message = error_of(raw)
    assert message.startswith(f"{path}: ") and '"auto"' in message and "Hugging Face Trainer" in message


def test_fp16_and_bf16_together():
    message = error_of({"fp16": {"enabled": True}, "bf16": {"enabled": True}})
    assert "fp16" in message and "bf16" in message


def test_old_bfloat16_key():
    assert load_quietly({"bfloat16": {"enabled": True}}).bf16.enabled
    assert "bfloat16" in error_of({"bf16": {"enabled": True}, "bfloat16": {"enabled": True}})
    assert "fp16" in error_of({"fp16": {"enabled": True}, "bfloat16": {"enabled": True}})


# --- optimizer section ---------------------------------------------------------------


@pytest.mark.parametrize("name, expected", [
    ("Adam", {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0, "adam_w_mode": True,
              "bias_correction": True, "torch_adam": False, "amsgrad": False}),
    ("SGD", {"lr": 1e-3, "momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0, "nesterov": False}),
    ("Lamb", {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0, "bias_correction": True,
              "max_coeff": 10.0, "min_coeff": 0.01, "max_grad_norm": 0.0}),
    ("Lion", {"lr": 1e-4, "betas": [0.9, 0.99], "weight_decay": 0.0}),
    ("Adagrad", {"lr": 1e-2, "eps": 1e-10, "weight_decay": 0.0}),
])
def test_optimizer_defaults(name, expected):
    params = load_quietly({"optimizer": {"type": name}}).optimizer.params
    assert {k: params[k] for k in expected} == expected


def test_optimizer_type_case_insensitive_and_adamw_forces_w_mode():
    config = load_quietly({"optimizer": {"type": "ADAMW", "params": {"adam_w_mode": False}}})
    assert config.optimizer.type == "adamw" and config.optimizer.params["adam_w_mode"] is True
    config = load_quietly({"optimizer": {"type": "adam", "params": {"adam_w_mode": False}}})
    assert config.optimizer.params["adam_w_mode"] is False
    assert load_quietly({"optimizer": {"type": "sgd"}}).optimizer.type == "sgd"


def test_unknown_optimizer_type_suggests():
    message = error_of({"optimizer": {"type": "Adamm"}})
    assert "unknown optimizer 'Adamm'" in message and "did you mean 'Adam'?" in message
    assert "Adagrad" in message and "Lion" in message


@pytest.mark.parametrize("name", ["OneBitAdam", "ZeroOneAdam", "OneBitLamb", "MuAdam", "MuAdamW", "MuSGD", "Muon"])
def test_known_deepspeed_optimizer_unsupported(name):
    message = error_of({"optimizer": {"type": name, "params": {"lr": 1e-3}}})
    assert f"'{name}' is not supported" in message
    assert "supported: Adam, AdamW, SGD, Lamb, Lion, Adagrad" in message


@pytest.mark.parametrize("raw, fragment", [
    ({"type": "Adam", "params": {"amsgrad": True}}, "amsgrad"),
    ({"type": "SGD", "params": {"nesterov": True}}, "momentum > 0"),
    ({"type": "Lamb", "params": {"max_grad_norm": 1.0}}, "gradient_clipping"),
    ({"type": "Lamb", "params": {"min_coeff": 2.0, "max_coeff": 1.0}}, "min_coeff"),
    ({"params": {"lr": 1e-3}}, "optimizer.type is missing"),
])
def test_optimizer_params_rejected(raw, fragment):
    assert fragment in error_of({"optimizer": raw})


# --- scheduler section ---------------------------------------------------------------


@pytest.mark.parametrize("name, params, expected", [
    ("WarmupLR", {}, {"warmup_min_lr": 0.0, "warmup_max_lr": None, "warmup_num_steps": 1000,
                      "warmup_type": "log"}),
    ("WarmupDecayLR", {"total_num_steps": 2000}, {"warmup_min_lr": 0.0, "warmup_max_lr": 0.001,
                                                  "warmup_num_steps": 1000, "warmup_type": "log"}),
    ("WarmupCosineLR", {"total_num_steps": 2000}, {"warmup_min_ratio": 0.0, "warmup_num_steps": 1000,
                                                   "cos_min_ratio": 1e-4, "warmup_type": "log"}),
    ("OneCycle", {"cycle_min_lr": 1e-4, "cycle_max_lr": 1e-3, "cycle_first_step_size": 100},
     {"decay_lr_rate": 0.0, "cycle_second_step_size": 100, "cycle_first_stair_count": 0,
      "cycle_second_stair_count": 0, "decay_step_size": 0, "cycle_momentum": True, "cycle_min_mom": 0.8,
      "cycle_max_mom": 0.9, "decay_mom_rate": 0.0}),
    ("LRRangeTest", {}, {"lr_range_test_min_lr": 1e-3, "lr_range_test_step_size": 2000,
                         "lr_range_test_step_rate": 1.0, "lr_range_test_staircase": False}),
])
def test_scheduler_defaults(name, params, expected):
    config = load_quietly({"scheduler": {"type": name, "params": params}})
    assert config.scheduler.type == name
    assert {k: config.scheduler.params[k] for k in expected} == expected


@pytest.mark.parametrize("name, params, missing", [
    ("WarmupDecayLR", {}, ["'total_num_steps'"]),
    ("WarmupCosineLR", {"warmup_num_steps": 10}, ["'total_num_steps'"]),
    ("OneCycle", {}, ["'cycle_min_lr'", "'cycle_max_lr'"]),
    ("OneCycle", {"cycle_min_lr": 0.1}, ["'cycle_max_lr'"]),
])
def test_missing_required_scheduler_params(name, params, missing):
    message = error_of({"scheduler": {"type": name, "params": params}})
    assert f"{name} needs" in message and all(m in message for m in missing)


def test_unknown_scheduler_type():
    message = error_of({"scheduler": {"type": "WarmupLRR"}})
    assert "unknown scheduler 'WarmupLRR'" in message and "did you mean 'WarmupLR'?" in message
    assert load_quietly({"scheduler": {"type": "warmuplr"}}).scheduler.type == "WarmupLR"


# --- batch sizes -------------------------------------------------------------------------


def batch_config(train=None, micro=None, gas=None) -> Config:
    raw = {k: v for k, v in (("train_batch_size", train), ("train_micro_batch_size_per_gpu", micro),
                             ("gradient_accumulation_steps", gas)) if v is not None}
    return Config.load(raw)


@pytest.mark.parametrize("train, micro, gas, dp, expected", [
    (32, 2, 2, 8, (32, 2, 2)),        # all three, consistent
    (32, 2, None, 8, (32, 2, 2)),     # train + micro -> gas
    (32, None, 4, 8, (32, 1, 4)),     # train + gas -> micro
    (None, 2, 3, 8, (48, 2, 3)),      # micro + gas -> train
    (16, None, None, 8, (16, 2, 1)),  # only train: gas 1
    (None, 4, None, 2, (8, 4, 1)),    # only micro: gas 1
    (16, None, 1, 1, (16, 16, 1)),    # the seed config on one device
])
def test_batch_triple_resolves(train, micro, gas, dp, expected):
    assert batch_config(train, micro, gas).resolve_batch(dp) == BatchSizes(*expected)


@pytest.mark.parametrize("train, micro, gas, dp, fragments", [
    (16, 3, 1, 8, ["train_batch_size 16 != train_micro_batch_size_per_gpu 3 × gradient_accumulation_steps 1 "
                   "× data-parallel size 8 = 24", "set train_batch_size to 24",
                   "set train_micro_batch_size_per_gpu to 2"]),
    (32, 2, 3, 8, ["train_batch_size 32 != ", "= 48", "set train_batch_size to 48",
                   "set gradient_accumulation_steps to 2"]),
    (16, 3, None, 8, ["train_batch_size 16", "train_micro_batch_size_per_gpu 3 × data-parallel size 8 = 24",
                      "set train_batch_size to 24", "set train_micro_batch_size_per_gpu to 1 or 2"]),
    (20, 2, None, 8, ["train_batch_size 20", "= 16", "set train_batch_size to 16 or 32"]),
    (16, None, 3, 8, ["train_batch_size 16", "gradient_accumulation_steps 3 × data-parallel size 8 = 24",
                      "set train_batch_size to 24", "set gradient_accumulation_steps to 1 or 2"]),
    (16, None, None, 3, ["train_batch_size 16", "data-parallel size 3", "set train_batch_size to 15 or 18"]),
    (4, None, None, 8, ["train_batch_size 4", "data-parallel size 8", "set train_batch_size to 8"]),
])
def test_batch_triple_impossible_shows_numbers_and_fix(train, micro, gas, dp, fragments):
    with pytest.raises(ConfigError) as info:
        batch_config(train, micro, gas).resolve_batch(dp)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message


def test_batch_needs_train_or_micro():
    with pytest.raises(ConfigError, match="train_batch_size"):
        batch_config(gas=2).resolve_batch(8)


# --- overrides and round trip ------------------------------------------------------------


def test_with_overrides():
    config = Config.load(SEED)
    new = config.with_overrides({"zero_optimization.stage": 1, "optimizer.params.weight_decay": 0.1,
                                 "zerojax.mesh.tensor": 2, "fp16": None, "bf16.enabled": True})
    assert new.zero_optimization.stage == 1 and new.optimizer.params["weight_decay"] == 0.1
    assert new.zerojax.mesh.tensor == 2 and new.bf16.enabled and not new.fp16.enabled
    assert config.zero_optimization.stage == 3 and config.raw == SEED       # original untouched
    with pytest.raises(ConfigError, match="zero_optimization.stage"):
        config.with_overrides({"zero_optimization.stage": 7})
    with pytest.raises(ConfigError, match="did you mean"):
        config.with_overrides({"zero_optimization.stag": 1})


def test_to_dict_round_trips():
    raw = {**SEED, "scheduler": {"type": "OneCycle", "params": {"cycle_min_lr": 1e-4, "cycle_max_lr": 1e-3}},
           "zerojax": {"mesh": {"data": 4}, "model": {"type": "gpt2"}}}
    config = Config.load(raw)
    again = load_quietly(json.loads(json.dumps(config.to_dict())))
    assert again == config
