"""DeepSpeed's own training loop, unchanged in shape, on zerojax.

    python examples/deepspeed_loop.py --deepspeed --deepspeed_config examples/ds_config.json

The script a DeepSpeed user already has (argparse + add_config_arguments, initialize with
training_data, then forward / backward / step) with two differences: the import line, and
a Flax NNX module whose `__call__(batch)` returns the loss in place of a torch nn.Module.
"""
import argparse
import os
import sys

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"

import numpy as np
import optax
from flax import nnx

import zerojax.deepspeed as deepspeed      # was: import deepspeed


class Net(nnx.Module):
    """A small classifier: which of 4 fixed centres is a point nearest?"""

    def __init__(self, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(16, 64, rngs=rngs)
        self.fc2 = nnx.Linear(64, 4, rngs=rngs)

    def __call__(self, batch):
        logits = self.fc2(nnx.relu(self.fc1(batch["x"])))
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


def add_argument():
    parser = argparse.ArgumentParser(description="zerojax.deepspeed example")
    parser.add_argument("--local_rank", type=int, default=-1, help="local rank passed from a distributed launcher")
    parser.add_argument("--epochs", type=int, default=4)
    parser = deepspeed.add_config_arguments(parser)
    return parser.parse_args()


def make_dataset(count: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(4, 16)).astype(np.float32)
    x = rng.normal(size=(count, 16)).astype(np.float32)
    y = np.argmin(((x[:, None] - centres) ** 2).sum(-1), -1).astype(np.int32)
    return [{"x": x[i], "y": y[i]} for i in range(count)]


args = add_argument()
if not args.deepspeed_config:
    args.deepspeed_config = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ds_config.json")
deepspeed.init_distributed()
trainset = make_dataset(1024)
net = Net(nnx.Rngs(0))
model_engine, optimizer, trainloader, lr_scheduler = deepspeed.initialize(
    args=args, model=net, model_parameters=None, training_data=trainset)

first = last = None
for epoch in range(args.epochs):
    running = []
    for step, batch in enumerate(trainloader):
        loss = model_engine(batch)
        model_engine.backward(loss)
        model_engine.step()
        running.append(float(loss))
    mean = float(np.mean(running))
    first = mean if first is None else first
    last = mean
    print(f"epoch {epoch}  loss {mean:.4f}  global_steps {model_engine.global_steps}  "
          f"lr {optimizer.param_groups[0]['lr']:.2e}")
sys.exit(0 if last < 0.8 * first else 1)
