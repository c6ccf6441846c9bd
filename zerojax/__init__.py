"""zerojax: DeepSpeed-style training (ZeRO 0-3, mixed precision) as one compiled JAX program."""
from zerojax.config import Config, ConfigError
from zerojax.engine import Engine, initialize
from zerojax.errors import CheckpointError
from zerojax.linen import from_linen
from zerojax.plan import (estimate_zero2_model_states_mem_needs,
                          estimate_zero2_model_states_mem_needs_all_cold,
                          estimate_zero2_model_states_mem_needs_all_live,
                          estimate_zero3_model_states_mem_needs,
                          estimate_zero3_model_states_mem_needs_all_cold,
                          estimate_zero3_model_states_mem_needs_all_live)
from zerojax.trainer import train

__all__ = ["CheckpointError", "Config", "ConfigError", "Engine", "initialize", "from_linen", "train",
           "estimate_zero2_model_states_mem_needs", "estimate_zero2_model_states_mem_needs_all_cold",
           "estimate_zero2_model_states_mem_needs_all_live", "estimate_zero3_model_states_mem_needs",
           "estimate_zero3_model_states_mem_needs_all_cold", "estimate_zero3_model_states_mem_needs_all_live"]
__version__ = "0.1.0"


def __getattr__(name):
    # Subsystems load on first use (`zerojax.rlhf.dpo(...)`, `zerojax.inference.pipeline(...)`).
    if name in ("inference", "rlhf", "serve"):
        import importlib
        return importlib.import_module(f"zerojax.{name}")
    raise AttributeError(f"module 'zerojax' has no attribute {name!r}")
