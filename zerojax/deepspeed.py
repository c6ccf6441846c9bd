"""DeepSpeed's API on zerojax: `import zerojax.deepspeed as deepspeed`.

    model_engine, optimizer, loader, lr_scheduler = deepspeed.initialize(
        args=args, model=MyModule(rngs=nnx.Rngs(0)), training_data=examples)
    for step, batch in enumerate(loader):
        loss = model_engine(batch)        # compiled forward + backward of one micro-batch
        model_engine.backward(loss)       # accumulates its gradients (ZeRO layout)
        model_engine.step()               # the update, at the accumulation boundary only

The loop runs three small compiled programs built from `zerojax.step`'s pieces: the
forward + backward of one micro-batch (`accumulate_gradients` with one micro step; its
gradients come out in their ZeRO layout, sharded from stage 2), an in-place add into the
accumulated gradients (donated), and at the boundary the update (`apply_accumulated`, the
same function the fused `train_step` ends with; the state donated): unscale, average over
the `gradient_accumulation_steps` micro-batches, clip by the global norm, skip on fp16
overflow. `engine.train_step(batch)` (one program for the whole step) stays the fast path.

Counters follow DeepSpeed: `global_steps` counts optimizer boundaries, fp16-skipped ones
included (`skipped_steps` counts those); the lr schedule advances only on applied steps.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import math
import os
import warnings
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from zerojax import checkpoint, distributed, optim
from zerojax.config import Config, ConfigError
from zerojax.engine import Engine
from zerojax.mesh import data_parallel_size
from zerojax.step import StepSpec, TrainState, accumulate_gradients, apply_accumulated, params_for_step

__all__ = ["initialize", "add_config_arguments", "init_distributed", "zero", "DeepSpeedEngine",
           "DeepSpeedDataLoader", "LRScheduler", "Optimizer"]


# ---------------------------------------------------------------------------------------
# the compiled pieces of the loop (pure functions; jitted once per engine)


def _forward_backward(spec: StepSpec, state: TrainState, batch: Any):
    """One micro-batch: (scaled grads in the ZeRO layout, unscaled loss, new model state)."""
    state = state._replace(params=params_for_step(spec, state.params))
    grads, loss, _, model_state = accumulate_gradients(spec, state, batch)
    return grads, loss, model_state


def _add(accumulated: Any, grads: Any) -> Any:
    return jax.tree.map(jnp.add, accumulated, grads)


# ---------------------------------------------------------------------------------------
# the engine


class DeepSpeedEngine(Engine):
    """zerojax's Engine with DeepSpeed's loop: `loss = engine(batch)`, `backward`, `step`.

    `engine(batch)` takes one micro-batch: `train_micro_batch_size_per_gpu × data-parallel
    size` rows in a single process (each process its share in multi-process runs).
    """

    def __init__(self, *, lr_schedule: Callable | None = None, **kwargs):
        super().__init__(**kwargs)
        self._lr_schedule = lr_schedule or self.lr_fn
        self.micro_steps = 0
        self.training = True
        self._accumulated = None        # summed scaled grads of this window, ZeRO layout
        self._pending = None            # (loss, grads) of the last forward, until backward
        self._boundary_metrics = None   # metrics of the last boundary step(), None elsewhere
        self._last_metrics = None       # metrics of the last update (loop or train_step)
        self.optimizer = Optimizer(self)
        self.lr_scheduler: LRScheduler | None = None
        self.local_rank = int(os.environ.get("LOCAL_RANK", jax.process_index()))
        self.global_rank = jax.process_index()
        self.world_size = int(self.mesh.devices.size)
        self.dp_world_size = data_parallel_size(self.mesh)
        self.device = self.mesh.local_devices[0] if hasattr(self.mesh, "local_devices") else jax.local_devices()[0]

        one_micro = dataclasses.replace(self.step_spec, micro_batches=1)
        grad_shardings = self.layout.shardings(self.step_spec.grad_specs)
        scalar = NamedSharding(self.mesh, PartitionSpec())
        self._forward_backward = jax.jit(
            functools.partial(_forward_backward, one_micro),
            out_shardings=(grad_shardings, scalar, self.state_shardings.model_state))
        self._add = jax.jit(_add, out_shardings=grad_shardings, donate_argnums=0)
        self._apply = jax.jit(functools.partial(apply_accumulated, self.step_spec),
                              out_shardings=(self.state_shardings, scalar), donate_argnums=0)

    # ---- DeepSpeed's sizes ------------------------------------------------------------
    def train_batch_size(self) -> int:
        return self.batch_sizes.train_batch_size

    def train_micro_batch_size_per_gpu(self) -> int:
        return self.batch_sizes.micro_batch_size

    def gradient_accumulation_steps(self) -> int:
        return self.batch_sizes.gradient_accumulation_steps

    def micro_batch_rows(self) -> int:
        """Rows `engine(batch)` takes in this process: micro × data-parallel / processes."""
        return self.batch_sizes.micro_batch_size * self.dp_world_size // jax.process_count()

    # ---- modes --------------------------------------------------------------------------
    def train(self, mode: bool = True) -> "DeepSpeedEngine":
        self.training = bool(mode)
        return self

    def eval(self) -> "DeepSpeedEngine":
        return self.train(False)

    @property
    def module(self) -> nnx.Module:
        """The nnx module with the current params (arrays stay sharded)."""
        return self.model()

    # ---- the loop -------------------------------------------------------------------------
    def _check_loop_supported(self) -> None:
        if self.step_spec.pipeline_schedule is not None:
            raise ConfigError("pipeline parallelism runs whole steps: use engine.train_step(batch) "
                              "(DeepSpeed's pipeline engine likewise only offers train_batch())")
        if self.nvme is not None:
            raise ConfigError("NVMe offload updates the optimizer sub-group by sub-group inside "
                              "train_step; use engine.train_step(batch) with it")

    def _micro_batch(self, args: tuple, kwargs: dict) -> dict:
        if args and kwargs or len(args) > 1:
            raise TypeError("engine(batch) takes one batch (a dict of arrays) or its fields as keywords")
        batch = args[0] if args else kwargs
        if not isinstance(batch, Mapping):
            raise TypeError(f"a batch is a dict of arrays, got {type(batch).__name__}")
        return batch

    def __call__(self, *args, **kwargs) -> jax.Array:
        """Forward (and, in training, the backward pass) of one micro-batch; returns its loss.

        In eval mode the loss alone, nothing accumulated (any rows divisible by the
        data-parallel size)."""
        batch = self._micro_batch(args, kwargs)
        if not self.training:
            return self.eval_step(batch)
        self._check_loop_supported()
        want = self.micro_batch_rows()
        for key, value in batch.items():
            if np.shape(value)[0] != want:
                raise ValueError(
                    f"batch[{key!r}] has {np.shape(value)[0]} rows; engine(batch) takes one micro-batch "
                    f"of {want} rows (train_micro_batch_size_per_gpu {self.batch_sizes.micro_batch_size}"
                    f" × data-parallel size {self.dp_world_size}"
                    + (f" / {jax.process_count()} processes" if jax.process_count() > 1 else "")
                    + "); engine.train_step(batch) takes a whole train_batch_size step")
        batch = self.shard_batch(batch)
        grads, loss, model_state = self._forward_backward(self.state, batch)
        self.state = self.state._replace(model_state=model_state)
        self._pending = (loss, grads)
        return loss

    def forward(self, *args, **kwargs) -> jax.Array:
        return self(*args, **kwargs)

    def backward(self, loss: jax.Array, retain_graph: bool = False, scale_wrt_gas: bool = True) -> jax.Array:
        """Accumulate the gradients of the forward that returned `loss` (computed there)."""
        if self._pending is None or self._pending[0] is not loss:
            if not self.training:
                why = "the engine is in eval mode (engine.eval()); call engine.train() before engine(batch)"
            elif self._pending is None:
                why = ("there is no forward to take gradients of: call loss = engine(batch) first "
                       "(each forward's gradients are accumulated by one backward)")
            else:
                why = ("this is not the loss the last forward, loss = engine(batch), returned; pass "
                       "that array itself (gradients are of the engine's loss, not of a value derived from it)")
            raise RuntimeError(f"engine.backward(loss): missing forward: {why}")
        _, grads = self._pending
        self._pending = None
        self._accumulated = grads if self._accumulated is None else self._add(self._accumulated, grads)
        return loss

    def is_gradient_accumulation_boundary(self) -> bool:
        """True while the micro-batch whose step() applies the update is being run."""
        return (self.micro_steps + 1) % self.gradient_accumulation_steps() == 0

    def step(self, lr_kwargs: Mapping | None = None) -> None:
        """The optimizer update at the accumulation boundary; elsewhere only counts the micro-step."""
        self._boundary_metrics = None
        if self.is_gradient_accumulation_boundary():
            if self._accumulated is None:
                raise RuntimeError("engine.step() at the accumulation boundary with no gradients: "
                                   "call engine.backward(engine(batch)) before step()")
            grads, self._accumulated = self._accumulated, None
            self.state, metrics = self._apply(self.state, grads)
            del grads
            self._boundary_metrics = self._last_metrics = metrics
            self.global_steps += 1
        self.micro_steps += 1

    def was_step_applied(self) -> bool:
        """Whether the last step() updated the params (False off the boundary or on fp16 overflow)."""
        return self._boundary_metrics is not None and not bool(self._boundary_metrics["skipped"])

    @property
    def skipped_steps(self) -> int:
        """Boundaries whose update was skipped (fp16 overflow)."""
        return self.global_steps - int(self.state.step)

    def get_global_grad_norm(self) -> float | None:
        """Global gradient norm of the last update, before clipping (None before the first)."""
        return None if self._last_metrics is None else float(self._last_metrics["grad_norm"])

    def get_lr(self) -> list[float]:
        """The lr the next update uses (DeepSpeed: the optimizer's param_groups' lr)."""
        return [float(self._lr_schedule(jnp.asarray(self.state.step)))]

    def get_loss_scale(self) -> float:
        return float(self.state.loss_scale.scale)

    @property
    def cur_scale(self) -> float:
        return self.get_loss_scale()

    # ---- the fused step and checkpoints ---------------------------------------------------
    def _check_at_boundary(self, what: str) -> None:
        if self._accumulated is not None or self.micro_steps % self.gradient_accumulation_steps():
            raise RuntimeError(
                f"{what} in the middle of gradient accumulation ({self.micro_steps % self.gradient_accumulation_steps()}"
                f" of {self.gradient_accumulation_steps()} micro-batches stepped, gradients "
                f"{'pending' if self._accumulated is not None else 'none'}): the accumulated gradients "
                f"would be lost; call it after the step() that applies the update")

    def train_step(self, batch: Mapping[str, Any]) -> dict:
        self._check_at_boundary("train_step()")
        metrics = super().train_step(batch)
        self._last_metrics = metrics
        self.micro_steps += self.gradient_accumulation_steps()
        return metrics

    def save_checkpoint(self, save_dir: str, tag: str | None = None, client_state: dict | None = None,
                        save_latest: bool = True, **kwargs) -> str:
        """DeepSpeed's save (tag `global_step{N}`, `latest`); only at an accumulation boundary."""
        if not save_latest:
            raise ValueError("save_latest=False is not supported: `latest` always names the newest checkpoint")
        self._check_at_boundary("save_checkpoint()")
        return super().save_checkpoint(save_dir, tag, client_state, **kwargs)

    def load_checkpoint(self, load_dir: str, tag: str | None = None, load_module_strict: bool = True,
                        load_optimizer_states: bool = True, load_lr_scheduler_states: bool = True,
                        load_module_only: bool = False, **kwargs) -> tuple[str, dict]:
        """Restore (any layout); drops gradients accumulated since the last boundary.

        The lr schedule is a function of the restored step, so `load_lr_scheduler_states`
        follows `load_optimizer_states`."""
        path, client_state = super().load_checkpoint(load_dir, tag, load_optimizer_states=load_optimizer_states,
                                                     load_module_only=load_module_only)
        self._accumulated = self._pending = self._boundary_metrics = None
        self.micro_steps = self.global_steps * self.gradient_accumulation_steps()
        return path, client_state

    def save_16bit_model(self, save_dir: str, save_filename: str = "model.safetensors") -> str:
        """The params as one safetensors file in the training dtype (fp16 / bf16; fp32 when
        neither is enabled, as DeepSpeed saves its fp32 module). Written by process 0;
        call it on every process. A `.bin` name is written as `.safetensors` (no pickles)."""
        from zerojax.safetensors_io import write_safetensors
        if save_filename.endswith((".bin", ".pt", ".pth")):
            save_filename = os.path.splitext(save_filename)[0] + ".safetensors"
        dtype = self.compute_dtype
        flat = {checkpoint.path_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(self.state.params)[0]}
        replicated = NamedSharding(self.mesh, PartitionSpec())
        gather = jax.jit(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                         out_shardings=replicated)
        out_dtype = lambda x: np.dtype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else np.dtype(x.dtype)
        path = os.path.join(save_dir, save_filename)

        def fetch(name):
            return np.asarray(gather(flat[name]).addressable_data(0))

        if jax.process_index() == 0:
            os.makedirs(save_dir, exist_ok=True)
            write_safetensors(path, [(n, x.shape, out_dtype(x)) for n, x in flat.items()], fetch,
                              metadata={"format": "pt", "global_steps": str(self.global_steps)})
        else:   # the gathers are collective: run them on every process
            for name in flat:
                fetch(name)
        return path


# ---------------------------------------------------------------------------------------
# what initialize returns besides the engine


class Optimizer:
    """DeepSpeed's returned optimizer, for reading: `param_groups[0]["lr"]` is the current lr.

    The engine applies the updates (step() is the engine's); `tx` is the optax transform."""

    def __init__(self, engine: DeepSpeedEngine):
        self._engine = engine
        self.tx = engine.tx

    @property
    def param_groups(self) -> list[dict]:
        return [{"lr": self._engine.get_lr()[0]}]

    @property
    def state(self) -> Any:
        return self._engine.state.opt_state

    @property
    def loss_scale(self) -> float:
        return self._engine.get_loss_scale()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to do: gradients are accumulated by the engine and cleared by its update."""


class LRScheduler:
    """The schedule the engine drives: step() is a no-op, as in DeepSpeed when the scheduler
    is handed to initialize (the engine steps it after each applied update)."""

    def __init__(self, engine: DeepSpeedEngine, schedule: Callable):
        self._engine = engine
        self.schedule = schedule

    def get_lr(self) -> list[float]:
        return self._engine.get_lr()

    def get_last_lr(self) -> list[float]:
        return self._engine.get_lr()

    @property
    def last_batch_iteration(self) -> int:
        return int(self._engine.state.step) - 1

    def step(self, *args, **kwargs) -> None:
        pass

    def state_dict(self) -> dict:
        return {"last_batch_iteration": self.last_batch_iteration}

    def load_state_dict(self, state: Mapping) -> None:
        """The schedule is a function of the engine's step, which load_checkpoint restores."""


def _default_collate(examples: list) -> Any:
    first = examples[0]
    if isinstance(first, Mapping):
        return {k: np.stack([np.asarray(e[k]) for e in examples]) for k in first}
    if isinstance(first, tuple):
        return tuple(np.stack([np.asarray(e[i]) for e in examples]) for i in range(len(first)))
    return np.stack([np.asarray(e) for e in examples])


class DeepSpeedDataLoader:
    """`training_data` in micro-batches of `rows` (micro × data-parallel) rows, in order.

    `training_data` is a sequence of examples (dicts of arrays, collated by `collate_fn`,
    default: stack each field) or a dict of arrays with one row per example. A last
    partial batch is dropped (a compiled step has one batch shape). In multi-process runs
    each process yields its own share of every batch."""

    def __init__(self, training_data: Any, rows: int, *, collate_fn: Callable | None = None,
                 process_index: int | None = None, process_count: int | None = None):
        self.data = training_data
        self.collate_fn = collate_fn or _default_collate
        self.process_count = jax.process_count() if process_count is None else process_count
        self.process_index = jax.process_index() if process_index is None else process_index
        self.global_rows = rows * self.process_count
        self.rows = rows
        if isinstance(training_data, Mapping):
            lengths = {k: len(v) for k, v in training_data.items()}
            if len(set(lengths.values())) > 1:
                raise ValueError(f"training_data fields have different numbers of rows: {lengths}")
            self.num_examples = next(iter(lengths.values()), 0)
        else:
            self.num_examples = len(training_data)
        if self.num_examples < self.global_rows:
            raise ValueError(f"training_data has {self.num_examples} examples, fewer than one batch "
                             f"({self.global_rows} rows: train_micro_batch_size_per_gpu × data-parallel size)")

    def __len__(self) -> int:
        return self.num_examples // self.global_rows

    def __iter__(self) -> Iterator[Any]:
        for b in range(len(self)):
            start = b * self.global_rows + self.process_index * self.rows
            index = range(start, start + self.rows)
            if isinstance(self.data, Mapping):
                if self.collate_fn is _default_collate:
                    yield {k: np.asarray(v[start:start + self.rows]) for k, v in self.data.items()}
                else:
                    yield self.collate_fn([{k: v[i] for k, v in self.data.items()} for i in index])
            else:
                yield self.collate_fn([self.data[i] for i in index])


# ---------------------------------------------------------------------------------------
# initialize and friends


class _ZeroInit(contextlib.ContextDecorator):
    """`with deepspeed.zero.Init(): initialize(model=MyModule, ...)`: build the model directly
    into its shards. A thin alias: `initialize` builds any class or function `rngs -> module`
    passed as `model` that way (it is zerojax's `model_fn`); DeepSpeed's arguments are
    accepted and ignored (the layout comes from the config given to initialize)."""

    active = 0

    def __init__(self, module: Any = None, *args, enabled: bool = True, **kwargs):
        self.enabled = enabled

    def __enter__(self):
        _ZeroInit.active += int(self.enabled)
        return self

    def __exit__(self, *exc):
        _ZeroInit.active -= int(self.enabled)
        return False


class _Zero:
    Init = _ZeroInit


zero = _Zero()


def add_config_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """DeepSpeed's `--deepspeed` and `--deepspeed_config` (plus the deprecated deepscale names)."""
    group = parser.add_argument_group("DeepSpeed", "DeepSpeed configurations")
    group.add_argument("--deepspeed", default=False, action="store_true",
                       help="Enable DeepSpeed (helper flag for user code, no impact on the backend)")
    group.add_argument("--deepspeed_config", default=None, type=str, help="DeepSpeed json configuration file.")
    group.add_argument("--deepscale", default=False, action="store_true", help=argparse.SUPPRESS)
    group.add_argument("--deepscale_config", default=None, type=str, help=argparse.SUPPRESS)
    return parser


def init_distributed(dist_backend: str | None = None, auto_mpi_discovery: bool = True, **kwargs) -> bool:
    """Join the multi-process run the environment describes (`zerojax launch`, SLURM, MPI,
    TPU pods) through `jax.distributed`; a no-op in a single process. Call it before
    anything touches a device. Returns whether this is a multi-process run."""
    return distributed.initialize()


def _config_source(args: Any, config: Any, config_params: Any) -> Any:
    if config is None:
        config = config_params
    elif config_params is not None:
        raise ConfigError("initialize(): pass config= or config_params= (its alias), not both")
    from_args = None
    if args is not None:
        from_args = getattr(args, "deepspeed_config", None) or getattr(args, "deepscale_config", None)
    if from_args is not None and config is not None:
        raise ConfigError(f"initialize(): a config came both in args.deepspeed_config ({from_args!r}) and "
                          f"as config=; pass one (DeepSpeed refuses this too)")
    config = config if config is not None else from_args
    if config is None:
        raise ConfigError("initialize() needs a DeepSpeed config: config= (a dict or a JSON path) or "
                          "args.deepspeed_config (--deepspeed_config ds_config.json with add_config_arguments)")
    return config


def _drive_lr(tx: optax.GradientTransformation, schedule: Callable) -> optax.GradientTransformation:
    """`tx` (made with optax.inject_hyperparams and a numeric learning_rate) with its lr set by
    `schedule(count)` before each update; count = updates applied (the injected state's)."""
    if optim._probe_user_optimizer(tx).learning_rate is None:
        raise ConfigError(
            "lr_scheduler= sets the optimizer's learning rate, but the optimizer does not expose a "
            "numeric learning_rate; build it with optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3), "
            "or pass a callable optimizer (learning_rate -> optax transform, e.g. optax.adamw)")

    def update(updates, state, params=None, **extra_args):
        count = next(optim._inject_states(state)).count
        state = optim._set_hyperparams(state, {"learning_rate": schedule(count)})
        return optax.with_extra_args_support(tx).update(updates, state, params, **extra_args)
    return optax.GradientTransformationExtraArgs(tx.init, update)


def _optimizer_and_schedule(cfg: Config, optimizer: Any, lr_scheduler: Any):
    """(config for the engine, optax transform or None, the lr schedule or None)."""
    if lr_scheduler is not None and not callable(lr_scheduler):
        raise ConfigError(f"lr_scheduler: expected an optax schedule or a callable step -> lr, got "
                          f"{type(lr_scheduler).__name__}")
    if lr_scheduler is not None and cfg.scheduler is not None:
        warnings.warn(f"initialize(): lr_scheduler= replaces the config's {cfg.scheduler.type} scheduler",
                      UserWarning, stacklevel=3)
    if optimizer is not None and not isinstance(optimizer, optax.GradientTransformation):
        if not callable(optimizer):
            raise ConfigError(f"optimizer: expected an optax GradientTransformation or a callable "
                              f"learning_rate -> GradientTransformation, got {type(optimizer).__name__}")
        # DeepSpeed calls an optimizer callable with the parameters; JAX needs none, so it
        # gets the learning rate (schedule): optimizer=optax.adamw works.
        schedule = lr_scheduler or optim.lr_schedule(cfg)
        if lr_scheduler is None and cfg.scheduler is None and math.isnan(float(schedule(0))):
            raise ConfigError("optimizer: a callable optimizer is called with the learning rate; set "
                              "optimizer.params.lr or a scheduler in the config, or pass lr_scheduler=")
        tx = optimizer(schedule)
        if not isinstance(tx, optax.GradientTransformation):
            raise ConfigError(f"optimizer: the callable returned {type(tx).__name__}, not an optax "
                              f"GradientTransformation")
        return cfg.with_overrides({"scheduler": None}), tx, schedule
    if lr_scheduler is None:
        return cfg, optimizer, None
    if optimizer is None:
        if cfg.optimizer is None:
            raise ConfigError("lr_scheduler= needs an optimizer: an 'optimizer' section in the config "
                              "or optimizer=")
        cfg = cfg.with_overrides({"scheduler": None})
        optimizer = optim.build_optimizer(cfg)
    else:
        cfg = cfg.with_overrides({"scheduler": None})
    return cfg, _drive_lr(optimizer, lr_scheduler), lr_scheduler


def _model_kwargs(model: Any, model_fn: Any, training_data: Any, collate_fn: Any) -> dict:
    if model is not None and model_fn is not None:
        raise TypeError("initialize(): pass model= or model_fn=, not both")
    if model is None and model_fn is None:
        raise TypeError("initialize(): model= is required (an nnx.Module, or a class / function "
                        "rngs -> module to build it directly sharded)")
    if model_fn is not None:
        return {"model_fn": model_fn}
    if isinstance(model, nnx.Module):
        if _ZeroInit.active:
            warnings.warn("zero.Init(): the module passed to initialize() was already built whole; pass "
                          "its class or a function rngs -> module to build it directly into its shards",
                          UserWarning, stacklevel=3)
        return {"model": model}
    try:
        from flax import linen
    except ImportError:     # pragma: no cover
        linen = None
    if linen is not None and isinstance(model, linen.Module):
        if training_data is None:
            raise TypeError("initialize(): a Flax Linen module is initialised from a batch; pass "
                            "training_data=, or wrap it yourself with zerojax.from_linen(module, batch)")
        from zerojax.linen import from_linen
        example = (collate_fn or _default_collate)([training_data[0]]) if not isinstance(training_data, Mapping) \
            else {k: np.asarray(v[:1]) for k, v in training_data.items()}
        return {"model": from_linen(model, example)}
    if isinstance(model, type) and issubclass(model, nnx.Module):
        return {"model_fn": lambda rngs: model(rngs=rngs)}
    if callable(model):
        return {"model_fn": model}
    raise TypeError(f"initialize(): model must be an nnx.Module or a function rngs -> module, got "
                    f"{type(model).__name__}")


def initialize(args: Any = None, model: Any = None, optimizer: Any = None, model_parameters: Any = None,
               training_data: Any = None, lr_scheduler: Any = None, mpu: Any = None,
               dist_init_required: bool | None = None, collate_fn: Callable | None = None,
               config: Any = None, config_params: Any = None, *, model_fn: Callable | None = None,
               devices=None):
    """DeepSpeed's initialize: returns `(engine, optimizer, dataloader, lr_scheduler)`.

    - config: a dict or JSON path, from `config=`, `config_params=` (alias) or
      `args.deepspeed_config`.
    - model: an `nnx.Module`, or a class / function `rngs -> module` (built directly into
      its shards; also under `zero.Init()`), or a Linen module (initialised from
      `training_data`'s first example). `model_parameters` is accepted and ignored.
    - optimizer: an optax GradientTransformation (replaces the config's section) or a
      callable `learning_rate -> GradientTransformation` (e.g. `optax.adamw`).
    - lr_scheduler: an optax schedule / callable `step -> lr` (replaces the config's
      scheduler); else the config's scheduler. The returned scheduler is None when there
      is neither (as in DeepSpeed).
    - training_data: a sequence of examples (dicts of arrays) or a dict of arrays; the
      returned dataloader is None without it.
    """
    if mpu is not None:
        raise ConfigError("mpu= (Megatron model-parallel groups) is not used by zerojax: tensor "
                          "parallelism comes from the config (tensor_parallel.autotp_size)")
    if dist_init_required is not False:
        init_distributed()
    del model_parameters      # JAX has no parameter list: the params live in the engine's state
    cfg = Config.load(_config_source(args, config, config_params))
    cfg, tx, schedule = _optimizer_and_schedule(cfg, optimizer, lr_scheduler)
    engine = DeepSpeedEngine(config=cfg, optimizer=tx, devices=devices, lr_schedule=schedule,
                             **_model_kwargs(model, model_fn, training_data, collate_fn))
    if schedule is not None or cfg.scheduler is not None:
        engine.lr_scheduler = LRScheduler(engine, engine._lr_schedule)
    loader = None
    if training_data is not None:
        loader = DeepSpeedDataLoader(training_data, engine.micro_batch_rows(), collate_fn=collate_fn)
    return engine, engine.optimizer, loader, engine.lr_scheduler
