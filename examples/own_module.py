"""Your own Flax NNX module under ZeRO-2 with `zerojax.initialize`: train, evaluate, save, load.

    python examples/own_module.py

An MLP classifier on synthetic data (the label is which of 4 fixed centres a point is nearest).
No sharding annotations: zerojax shards the optimizer state and gradients over the devices.
"""
import os
import sys
import tempfile

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"

import numpy as np
import optax
from flax import nnx

import zerojax


class MLP(nnx.Module):
    def __init__(self, din, hidden, classes, *, rngs):
        self.fc1, self.fc2 = nnx.Linear(din, hidden, rngs=rngs), nnx.Linear(hidden, classes, rngs=rngs)

    def __call__(self, batch):                   # a batch in, (loss, metrics) out
        logits = self.fc2(nnx.relu(self.fc1(batch["x"])))
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
        return loss, {"accuracy": (logits.argmax(-1) == batch["y"]).mean()}


rng = np.random.default_rng(0)
centres = rng.normal(size=(4, 16)).astype(np.float32)
def make_batch(rows):
    x = rng.normal(size=(rows, 16)).astype(np.float32)
    return {"x": x, "y": np.argmin(((x[:, None] - centres) ** 2).sum(-1), -1).astype(np.int32)}


engine = zerojax.initialize(model=MLP(16, 64, 4, rngs=nnx.Rngs(0)), config={
    "train_batch_size": 64,
    "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.01}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 10}},
    "zero_optimization": {"stage": 2}})
for step in range(1, 201):
    metrics = engine.train_step(make_batch(64))
    if step % 50 == 0:
        print(f"step {step}  loss {float(metrics['loss']):.4f}  grad_norm {float(metrics['grad_norm']):.3f}")
val = make_batch(512)
val_loss = float(engine.eval_step(val))
print(f"validation loss {val_loss:.4f} (chance: {np.log(4):.4f})")

with tempfile.TemporaryDirectory() as ckpt:
    engine.save_checkpoint(ckpt, client_state={"note": "own module"})
    fresh = zerojax.initialize(model=MLP(16, 64, 4, rngs=nnx.Rngs(1)), config=engine.config)
    path, client_state = fresh.load_checkpoint(ckpt)
    restored = float(fresh.eval_step(val))
    print(f"loaded {os.path.basename(path)} {client_state}: validation loss {restored:.4f}")
sys.exit(0 if val_loss < 0.5 * np.log(4) and abs(restored - val_loss) < 1e-5 else 1)
