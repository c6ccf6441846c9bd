"""Simulated CPU devices for the benchmark scripts; import and call before jax is imported."""
import os


def set_device_count(count: int) -> None:
    """Replace any XLA device-count flag with `count` CPU devices."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={count}"])
    os.environ["JAX_PLATFORMS"] = "cpu"
