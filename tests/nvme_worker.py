"""Subprocess side of tests/test_nvme.py: a run whose peak RSS is measured, and a run killed
in the middle of an NVMe optimizer step.

    python -m tests.nvme_worker rss plain|nvme NVME_PATH      -> one JSON line
    python -m tests.nvme_worker crash NVME_PATH CKPT_DIR     -> exits 17 half-way through the last step
"""
from __future__ import annotations

import json
import os
import re
import sys

if __name__ == "__main__":
    # The RSS runs use one device (a replicated layout on 8 simulated devices would hold 8
    # copies in the same RAM); the crash run the test's 8.
    os.environ["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                                     os.environ.get("XLA_FLAGS", "")) + \
        f" --xla_force_host_platform_device_count={1 if sys.argv[1] == 'rss' else 8}"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import zerojax  # noqa: E402

# 25.2M params (Adam's state: 201 MB) in 4 MB leaves: the NVMe step's transient buffers are
# a few leaves and sub-groups, small against the state it keeps out of memory.
WIDTH, LAYERS, ROWS = 1024, 24, 4
SUB_GROUP = 1 << 18


class Wide(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        # A constant init: the random one costs seconds of compute at this size.
        init = nnx.initializers.constant(1.0 / WIDTH)
        self.layers = nnx.List([nnx.Linear(WIDTH, WIDTH, kernel_init=init, rngs=rngs) for _ in range(LAYERS)])

    def __call__(self, batch):
        h = batch["x"]
        for layer in self.layers:
            h = jnp.tanh(layer(h))
        return jnp.mean((h - batch["y"]) ** 2)


def rss_config(nvme_path: str | None) -> dict:
    zero = {"stage": 0}
    if nvme_path:
        zero.update(sub_group_size=SUB_GROUP, offload_optimizer={
            "device": "nvme", "nvme_path": nvme_path, "buffer_count": 2,
            "pipeline_read": True, "pipeline_write": True})
    return {"train_batch_size": ROWS, "optimizer": {"type": "Adam", "params": {"lr": 1e-3}},
            "zero_optimization": zero}


def peak_rss() -> int:
    """This process's peak resident set size (the kernel's VmHWM).

    Not `getrusage().ru_maxrss`: on Linux that folds in the memory image the process had
    before exec, and a subprocess started (vfork + exec) from a large parent — pytest holding
    other tests' engines — reports the parent's peak. VmHWM is the peak since exec.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def rss(kind: str, nvme_path: str) -> None:
    engine = zerojax.initialize(model_fn=Wide, config=rss_config(nvme_path if kind == "nvme" else None))
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(2):
        batch = {"x": rng.normal(size=(ROWS, WIDTH)).astype(np.float32),
                 "y": rng.normal(size=(ROWS, WIDTH)).astype(np.float32)}
        losses.append(float(engine.train_step(batch)["loss"]))
    params = sum(x.size for x in jax.tree.leaves(engine.state.params))
    print(json.dumps({"peak_rss_bytes": peak_rss(),
                      "optimizer_state_bytes": 2 * 4 * params, "losses": losses,
                      "files": sorted(os.listdir(nvme_path)) if kind == "nvme" else []}))


def crash(nvme_path: str, ckpt_dir: str) -> None:
    """test_nvme's stage-1 run: all steps but the last, a checkpoint, then the last step dies
    after writing half of its sub-groups (in an I/O thread: the writes are pipelined)."""
    from tests.helpers import tiny_llama, token_batches
    from tests.test_nvme import ROWS, STEPS, config
    from zerojax import nvme

    engine = zerojax.initialize(model_fn=tiny_llama, config=config(1, nvme_path))
    batches = token_batches(STEPS, ROWS)
    for batch in batches[:-1]:
        engine.train_step(batch)
    engine.save_checkpoint(ckpt_dir)
    total = sum(g.count for g in engine.nvme.groups)
    written = []
    write = nvme.NvmeOptimizer._write

    def dying_write(self, slot, g, k, views):
        write(self, slot, g, k, views)
        written.append((g, k))
        if len(written) == total // 2:
            os._exit(17)

    nvme.NvmeOptimizer._write = dying_write
    engine.train_step(batches[-1])
    raise SystemExit("the step finished: the crash hook did not fire")


if __name__ == "__main__":
    if sys.argv[1] == "rss":
        rss(sys.argv[2], sys.argv[3])
    else:
        crash(sys.argv[2], sys.argv[3])
