"""`zerojax.initialize` and the Engine: state, the compiled step, eval, memory report.

Data flows one way: config -> mesh -> abstract model (eval_shape) -> logical axes ->
StateLayout (ZeRO stage) -> state created directly into its shards -> one jitted step.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from zerojax import block_remat, buckets, checkpoint, compute, host_memory, kernels, nvme, offload, optim, partition, precision
from zerojax.config import BatchSizes, Config, ConfigError, RematPolicy
from zerojax.errors import CheckpointError
from zerojax.mesh import BATCH_AXES, build_mesh, data_parallel_size
from zerojax.step import StepSpec, TrainState, eval_loss, train_step


def _replicated(mesh, x) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(*([None] * np.ndim(x))))


def _bytes_per_device(tree: Any, shardings: Any) -> int:
    """Bytes one device holds of a tree laid out by `shardings` (layouts are symmetric)."""
    total = 0
    for leaf, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
        total += math.prod(sharding.shard_shape(np.shape(leaf))) * jnp.dtype(leaf.dtype).itemsize
    return total


def decay_mask(logical: Any, abstract_params: Any, mode: str) -> Any:
    """`no_bias_norm`: decay only matrices (>= 2 dims besides the stacked `layers` axis)."""
    if mode == "all":
        return None

    def is_matrix(axes, p):
        dims = len(p.shape) if axes is None else sum(a != "layers" for a in axes)
        return dims >= 2

    return jax.tree.map(is_matrix, logical, abstract_params,
                        is_leaf=lambda x: x is None or isinstance(x, tuple))


def use_compilation_cache(path: str) -> None:
    """JAX's persistent compilation cache in `path`, keeping every program (not only those
    over JAX's 1 s default): a rerun loads its executables instead of compiling them, which
    also skips the compiler's few hundred MB of transient host memory."""
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def resolve_remat(remat: Any, stage: int, checkpointing: Any, platform: str, *,
                  gathers_per_layer: bool | None = None) -> Any:
    """The remat setting the layers use: a mode ("full" | "minimal" | "none") or a RematPolicy.

    "auto": ZeRO-3 gathering per layer must not keep gathered params for the backward
    pass: "full". (On CPU "minimal" would not keep them either and measured ~9% faster, but
    it lets a layer's re-gather run beside the previous layer's gradient all-reduce, and
    XLA:CPU's in-process collectives deadlock when devices start them in different orders.)
    A DeepSpeed `activation_checkpointing` section asks for "full" too. Otherwise, on CPU,
    "minimal" (keep only matmul outputs): saving every intermediate costs more memory
    traffic than recomputing the element-wise work, so it is both faster and smaller there
    (benchmarks/NOTES.md); on accelerators keep everything, as DeepSpeed does when nothing
    is asked. A bucketed step, and ZeRO-3 in one CPU process (`buckets.gathers_whole_step`),
    gather the params for the whole step (`gathers_per_layer` False), so they follow the
    non-ZeRO-3 rule.
    `checkpointing`: the parsed `activation_checkpointing` section, or None when absent.
    Its `cpu_checkpointing` (DeepSpeed: keep the checkpointed layer inputs in CPU memory)
    offloads each layer's input to pinned host memory, unless the remat policy names it.
    """
    if gathers_per_layer is None:
        gathers_per_layer = stage >= 3
    if remat == "auto":
        if gathers_per_layer or checkpointing is not None:
            remat = "full"
        else:
            remat = "minimal" if platform == "cpu" else "none"
    if checkpointing is not None and checkpointing.cpu_checkpointing:
        policy = remat if isinstance(remat, RematPolicy) else RematPolicy(policy=remat)
        if "layer_input" not in policy.save + policy.offload + policy.remat:
            policy = dataclasses.replace(policy, offload=policy.offload + ("layer_input",))
        return policy
    return remat


class Engine:
    """One model, one optimizer, one mesh: DeepSpeed's engine as a compiled JAX program."""

    def __init__(self, *, config: Config, model: nnx.Module | None = None,
                 model_fn: Callable[[nnx.Rngs], nnx.Module] | None = None,
                 optimizer: optax.GradientTransformation | None = None,
                 example_batch: Mapping[str, Any] | None = None, devices=None,
                 abstract: bool = False):
        if (model is None) == (model_fn is None):
            raise TypeError("pass exactly one of model= (an nnx.Module) or model_fn= (rngs -> nnx.Module)")
        self.config = config
        self.mesh = build_mesh(config, devices)
        self.batch_sizes: BatchSizes = config.resolve_batch(data_parallel_size(self.mesh))
        self.compute_dtype = precision.compute_dtype(config)

        if config.zerojax.compilation_cache:
            # Before anything compiles, so a rerun also loads the sharded init program.
            use_compilation_cache(config.zerojax.compilation_cache)
        seed = config.zerojax.seed
        with nnx.use_eager_sharding(False):
            abstract_model = nnx.eval_shape(lambda: model_fn(nnx.Rngs(seed))) if model_fn else model
            self.graphdef, abstract_params, abstract_rest = nnx.split(abstract_model, nnx.Param, ...)
        self._casts_per_layer = bool(getattr(abstract_model, "zerojax_casts_per_layer", False))
        logical = partition.logical_axes(abstract_params)
        abstract_params = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype),
                                       nnx.to_pure_dict(abstract_params))
        abstract_rest = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype),
                                     nnx.to_pure_dict(abstract_rest))
        stage = config.zero_optimization.stage
        self._check_sequence_parallel(getattr(abstract_model, "cfg", None))
        self.rules = partition.fit_rules(abstract_params, logical, self.mesh)
        self.layout = partition.make_layout(
            abstract_params, logical, self.mesh, stage,
            persistence_threshold=config.zero_optimization.stage3_param_persistence_threshold,
            rules=self.rules)
        self.offload_memory_kind = offload.optimizer_memory_kind(config, self.mesh)
        self.param_memory_kind = offload.param_memory_kind(config, self.mesh, self.compute_dtype)
        self.bucket_plan = self._bucket_plan(config, abstract_params)
        self.gathers_whole_step = self.bucket_plan is None and buckets.gathers_whole_step(
            config, self.layout, abstract_params, other_step=self._other_step(config))

        mask = decay_mask(logical, abstract_params, config.zerojax.weight_decay_mask)
        self.tx = optim.build_optimizer(config, optimizer=optimizer, decay_mask=mask)
        self.lr_fn = optim.lr_schedule(config, optimizer=optimizer)
        # A model names the param subtrees that never train (e.g. DPO's reference policy):
        # the optimizer and its state cover the others only.
        frozen = tuple(getattr(abstract_model, "zerojax_frozen", ()))
        trained = optim.trained_params(abstract_params, frozen) if frozen else abstract_params
        abstract_opt = jax.eval_shape(self.tx.init, trained)
        opt_specs = self.layout.optimizer_specs(self.tx, abstract_opt, subtrees=tuple(trained) if frozen else None)
        if frozen:
            unknown = sorted(set(frozen) - set(abstract_params))
            if unknown:
                raise ConfigError(f"zerojax_frozen names {unknown}, which are not param subtrees "
                                  f"({sorted(abstract_params)})")
            self.tx = optim.freeze(self.tx, frozen)

        loss_scale = precision.init_loss_scale(config)
        replicated = lambda tree: jax.tree.map(lambda x: _replicated(self.mesh, x), tree)
        opt_shardings, opt_on_device = offload.place(self.layout.shardings(opt_specs),
                                                     self.offload_memory_kind)
        param_shardings, params_on_device = offload.place(self.layout.shardings(self.layout.params),
                                                          self.param_memory_kind)
        self.nvme: nvme.NvmeOptimizer | None = None
        if nvme.enabled(config):
            # ZeRO-Infinity: the state lives in files; the state keeps the optimizer's scalars.
            self.nvme = nvme.NvmeOptimizer(
                config=config, mesh=self.mesh, abstract_params=abstract_params,
                param_shardings=param_shardings, trained=tuple(trained) if frozen else None,
                decay_mask=mask, canonical_abstract=abstract_opt, canonical_shardings=opt_shardings,
                optimizer=optimizer, create_files=not abstract)
            abstract_opt, opt_shardings = self.nvme.abstract_scalars, self.nvme.scalar_shardings
        self.state_shardings = TrainState(
            params=param_shardings,
            opt_state=opt_shardings,
            step=_replicated(self.mesh, 0),
            loss_scale=replicated(loss_scale),
            model_state=replicated(abstract_rest),
        )
        self._abstract_params = abstract_params
        if abstract:
            # Shapes and shardings only: plan memory and compile for models that do not fit here.
            as_struct = lambda x, sh: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sh)
            self.state = jax.tree.map(as_struct, TrainState(abstract_params, abstract_opt, np.int32(0),
                                                            jax.tree.map(np.asarray, loss_scale),
                                                            abstract_rest), self.state_shardings)
        else:
            self.state: TrainState = self._create_state(model, model_fn, seed, loss_scale)
            host_memory.release_freed()     # the init programs' compile: the step's compile peaks next

        checkpointing = config.activation_checkpointing if "activation_checkpointing" in config.raw else None
        platform = self.mesh.devices.flat[0].platform
        remat = resolve_remat(config.zerojax.remat, stage, checkpointing, platform,
                              gathers_per_layer=stage >= 3 and self.bucket_plan is None
                              and not self.gathers_whole_step)
        self.policy = compute.ComputePolicy(
            dtype=self.compute_dtype, mesh=self.mesh, rules=self.rules,
            sequence_parallel=config.zerojax.sequence_parallel.strategy,
            gather_params=stage >= 3 and not self.gathers_whole_step, remat=remat,
            kernels=kernels.resolve(config.zerojax.kernels))
        self.step_spec = StepSpec(
            graphdef=self.graphdef, tx=self.tx, lr_fn=self.lr_fn, policy=self.policy,
            grad_specs=self.layout.grads, micro_batches=self.batch_sizes.gradient_accumulation_steps,
            gradient_clipping=config.gradient_clipping, fp16=config.fp16.enabled, config=config,
            cast_params_whole=not self._casts_per_layer and self.compute_dtype != jnp.float32,
            cast_shards_first=(self.layout.params if self._casts_per_layer and stage >= 3
                               and self.compute_dtype != jnp.float32 else None),
            logical=logical, pipeline_schedule=self._pipeline_schedule(abstract_model),
            opt_state_on_device=opt_on_device, params_on_device=params_on_device,
            gathered_specs=self.layout.compute if self.gathers_whole_step else None,
            **self._user_module_remat(config.zerojax.remat, remat, checkpointing, platform, abstract_model),
            gemm_form_dots=platform == "cpu",
            bf16_dots_in_f32=platform == "cpu" and self.compute_dtype == jnp.bfloat16,
            stream_offloaded_update=(opt_on_device is not None or params_on_device is not None)
            and optimizer is None and config.optimizer is not None
            and config.optimizer.type in offload.ELEMENTWISE_OPTIMIZERS)
        if self.bucket_plan is not None:
            # Bucketed: stage 1 too reduce-scatters its gradients (its update needs only the
            # shard).
            self.step_spec = dataclasses.replace(
                self.step_spec, bucket_plan=self.bucket_plan,
                grad_specs=self.bucket_plan.grad_specs(abstract_params))
        metrics_sharding = NamedSharding(self.mesh, PartitionSpec())
        self._train_step = jax.jit(functools.partial(train_step, self.step_spec),
                                   out_shardings=(self.state_shardings, metrics_sharding),
                                   donate_argnums=0)
        if self.nvme is not None:     # gradients only: the update runs sub-group by sub-group
            self._train_step = self.nvme.jit_gradient_step(
                self.step_spec, self.state_shardings, self.layout.shardings(self.layout.zero), metrics_sharding)
        self._eval_step = jax.jit(functools.partial(eval_loss, self.step_spec),
                                  out_shardings=metrics_sharding)
        self._example_batch = example_batch
        self._executables: dict[tuple, jax.stages.Compiled] = {}
        self.global_steps = 0          # train_step calls, skipped ones included (DeepSpeed's count)
        self._saver: checkpoint.Saver | None = None
        cfg = getattr(abstract_model, "cfg", None)
        self.model_section = ({"type": type(abstract_model).__name__.lower(), **dataclasses.asdict(cfg)}
                              if dataclasses.is_dataclass(cfg) else None)
        # A wrapper (e.g. a reward model over a Llama) names what its checkpoint holds itself.
        self.model_section = getattr(abstract_model, "zerojax_model_section", None) or self.model_section

    def _bucket_plan(self, config: Config, abstract_params: Any):
        """Flat-bucket collectives for this run (zerojax.buckets), or None. Under ZeRO-3 a
        bucketed step keeps the gradient and optimizer state of a param stored whole (below
        `stage3_param_persistence_threshold`: small) whole too, updated on every device:
        its gradient is all-reduced in a bucket and nothing is gathered after the update."""
        plan = buckets.select(config, self.layout, abstract_params, other_step=self._other_step(config))
        if plan is None or self.layout.stage < 3:
            return plan
        self.layout = buckets.keep_whole_params_whole(self.layout)
        return buckets.select(config, self.layout, abstract_params, other_step=None)

    def _user_module_remat(self, requested: Any, remat: Any, checkpointing: Any, platform: str,
                           model: nnx.Module) -> dict[str, Any]:
        """Remat for a module that does not remat per layer itself (a user's): StepSpec's
        `block_remat` and `whole_model_remat`.

        Its repeated blocks (`block_remat.repeated_blocks`) each run under the resolved
        policy, as the reference models' layers do. "auto" does so under a DeepSpeed
        `activation_checkpointing` section ("full"), and on CPU ("minimal") where this
        process runs several devices: the host then holds every device's activations and
        they set the peak (the user GPT at 1 x 2: 650 -> 575 MiB, as fast). With one device
        per process the compiler's transient memory is the peak, and the larger program
        raised it (616 -> 661 MiB), so "auto" leaves the module alone there, as it does on
        accelerators. A module without repeated blocks gets a checkpoint over its whole
        loss when a mode is asked for explicitly (`compute.whole_model_policy`)."""
        none = {"block_remat": None, "whole_model_remat": None}
        if self._casts_per_layer or remat == "none":
            return none
        if block_remat.repeated_blocks(model):
            local = sum(d.process_index == jax.process_index() for d in self.mesh.devices.flat)
            if requested == "auto" and checkpointing is None and not (platform == "cpu" and local > 1):
                return none
            return {**none, "block_remat": compute.checkpoint_policy(remat)}
        return none if requested == "auto" else {**none, "whole_model_remat": compute.whole_model_policy(remat)}

    def _other_step(self, config: Config) -> str | None:
        """The step this run takes when not the plain one (named for messages), or None.
        (Pipeline stages need a `pipe` axis, which `buckets.unsupported_reason` refuses.)"""
        offloaded = self.offload_memory_kind is not None or self.param_memory_kind is not None
        return "NVMe offload" if nvme.enabled(config) else "offload" if offloaded else None

    def _pipeline_schedule(self, model) -> str | None:
        """The pipeline schedule when the mesh has stages; impossible settings are ConfigErrors."""
        from zerojax import pipeline
        stages = self.mesh.shape["pipe"]
        if stages == 1:
            return None
        cfg = self.config.pipeline
        missing = [m for m in pipeline.REQUIRED if not callable(getattr(model, m, None))]
        if missing:
            raise ConfigError(
                f"pipeline.stages {stages}: the model must split into stages, but {type(model).__name__} "
                f"has no {', '.join(missing)} (implement embed(ids), run_layers(x) over stacked "
                f"'layers' params, and head_loss(x, batch), as zerojax.models.Llama does)")
        if cfg.schedule == "interleaved":
            raise ConfigError('pipeline.schedule "interleaved" is not implemented yet; use "1f1b" or "gpipe"')
        if cfg.partition not in ("best", "uniform", "parameters"):
            raise ConfigError(f"pipeline.partition {cfg.partition!r} is not supported: stages get equal "
                              f"slices of the stacked layers; use 'uniform', 'parameters' or 'best'")
        micro = self.batch_sizes.gradient_accumulation_steps
        if cfg.schedule == "1f1b" and micro < stages:
            raise ConfigError(
                f"1F1B with {stages} pipeline stages needs at least {stages} micro-batches "
                f"(gradient_accumulation_steps), got {micro}; raise gradient_accumulation_steps "
                f"to >= {stages} or use pipeline.schedule \"gpipe\"")
        return cfg.schedule

    def _check_sequence_parallel(self, model_cfg) -> None:
        """Ulysses splits attention heads over the sequence axis: they must divide."""
        sequence = self.mesh.shape["sequence"]
        strategy = self.config.zerojax.sequence_parallel.strategy
        heads = getattr(model_cfg, "num_attention_heads", None) or getattr(model_cfg, "n_head", None)
        if sequence > 1 and strategy == "ulysses" and heads and heads % sequence:
            raise ConfigError(
                f"Ulysses sequence parallelism splits the {heads} attention heads over sequence size "
                f"{sequence}, which does not divide them; use a sequence_parallel_size that divides "
                f"{heads}, or \"zerojax\": {{\"sequence_parallel\": {{\"strategy\": \"ring\"}}}}")

    # ---- state creation -------------------------------------------------------------
    def _create_state(self, model, model_fn, seed, loss_scale) -> TrainState:
        shardings = self.state_shardings
        if model_fn is not None:
            # Build the model inside jit with sharded outputs: no device ever holds it whole.
            def init():
                with nnx.use_eager_sharding(False):
                    built = model_fn(nnx.Rngs(seed))
                _, params, rest = nnx.split(built, nnx.Param, ...)
                return nnx.to_pure_dict(params), nnx.to_pure_dict(rest)

            params, rest = jax.jit(init, out_shardings=(shardings.params, shardings.model_state))()
        else:
            _, params, rest = nnx.split(model, nnx.Param, ...)
            # From host numpy: a device_put of a live single-device buffer can alias it,
            # and donating the aliased buffer later fails.
            params = jax.device_put(jax.tree.map(np.asarray, nnx.to_pure_dict(params)), shardings.params)
            rest = jax.device_put(jax.tree.map(self._host_copy, nnx.to_pure_dict(rest)), shardings.model_state)
        opt_state = (self.nvme.initialize(params) if self.nvme is not None
                     else jax.jit(self.tx.init, out_shardings=shardings.opt_state)(params))
        return TrainState(
            params=params, opt_state=opt_state,
            step=jax.device_put(np.asarray(0, np.int32), shardings.step),
            loss_scale=jax.device_put(jax.tree.map(np.asarray, loss_scale), shardings.loss_scale),
            model_state=rest)

    @staticmethod
    def _host_copy(x):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(np.asarray(jax.random.key_data(x)), impl=jax.random.key_impl(x))
        return np.asarray(x)

    # ---- batches ----------------------------------------------------------------------
    def batch_sharding(self, ndim: int) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))

    def shard_batch(self, batch: Mapping[str, Any], rows: int | None = None) -> dict:
        """Place a host batch on the mesh, rows split over the data axes.

        In a multi-process run each process passes its own rows and the global array is
        assembled from the process-local pieces.
        """
        if not isinstance(batch, Mapping):
            raise TypeError(f"a batch is a dict of arrays, got {type(batch).__name__}")
        out = {}
        sequence = self.mesh.shape["sequence"]
        for key, value in batch.items():
            value = np.asarray(value) if not isinstance(value, jax.Array) else value
            if sequence > 1 and value.ndim >= 2 and value.shape[1] % sequence:
                raise ConfigError(
                    f"batch[{key!r}] has length {value.shape[1]}, which the sequence-parallel size "
                    f"{sequence} does not divide; use a sequence length that is a multiple of {sequence}")
            if rows is not None and value.shape[0] != rows // jax.process_count():
                raise ValueError(
                    f"batch[{key!r}] has {value.shape[0]} rows; this step needs train_batch_size "
                    f"{rows}" + (f" / {jax.process_count()} processes = {rows // jax.process_count()}"
                                 if jax.process_count() > 1 else "")
                    + " rows (micro batch × gradient_accumulation_steps × data-parallel size)")
            sharding = self.batch_sharding(value.ndim)
            if jax.process_count() > 1:
                out[key] = jax.make_array_from_process_local_data(sharding, np.asarray(value))
            else:
                out[key] = jax.device_put(value, sharding)
        return out

    # ---- the API -----------------------------------------------------------------------
    def train_step(self, batch: Mapping[str, Any]) -> dict:
        """One optimizer step over `train_batch_size` rows; returns metrics (0-d jax arrays)."""
        batch = self.shard_batch(batch, rows=self.batch_sizes.train_batch_size)
        if self._example_batch is None:
            self._example_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
        compiled = self._compiled("train", batch)
        if self.nvme is not None:
            self.state, metrics = self.nvme.train_step(compiled, self.state, batch)
        else:
            self.state, metrics = compiled(self.state, batch)
        self.global_steps += 1
        return metrics

    def eval_step(self, batch: Mapping[str, Any]) -> jax.Array:
        """Model loss on a batch (rows divisible by the data-parallel size), no update."""
        rows = next(iter(batch.values())).shape[0] * jax.process_count()
        dp = data_parallel_size(self.mesh)
        if rows % dp:
            raise ValueError(f"eval batch has {rows} rows, not divisible by the data-parallel size {dp}")
        batch = self.shard_batch(batch)
        return self._compiled("eval", batch)(self.state, batch)

    def _compiled(self, kind: str, batch: Mapping[str, Any]) -> jax.stages.Compiled:
        """The train or eval step compiled for this batch's global shapes, once per shape.

        Compiling here rather than inside jit's first call lets the host give back what the
        compiler freed before the step's buffers are allocated (peak RSS), and lets
        `memory_report` read the same executable that trains.
        """
        key = (kind, *sorted((k, tuple(v.shape), np.dtype(v.dtype).name) for k, v in batch.items()))
        if key not in self._executables:
            step = self._train_step if kind == "train" else self._eval_step
            self._executables[key] = step.lower(self.state, batch).compile()
            host_memory.release_freed()
        return self._executables[key]

    @property
    def params(self) -> Any:
        return self.state.params

    def set_params(self, params: Any) -> None:
        """Replace the params (e.g. from `zerojax.hf.load_params(dir, shardings=...)`); the
        optimizer state is kept. Shapes must match; arrays are moved to this engine's layout."""
        want = checkpoint.shapes_of(checkpoint.to_nested(self.state.params))
        got = checkpoint.shapes_of(checkpoint.to_nested(params))
        if {k: v[0] for k, v in want.items()} != {k: v[0] for k, v in got.items()}:
            bad = sorted(k for k in set(want) | set(got) if want.get(k, [None])[0] != got.get(k, [None])[0])
            raise ValueError(f"params do not fit this model: {bad[:5]}")
        params = checkpoint.from_nested(self.state.params, checkpoint.to_nested(params))
        params = jax.tree.map(lambda p, like: jnp.asarray(p, like.dtype), params, self.state.params)
        given = {id(x) for x in jax.tree.leaves(params)}
        params = jax.device_put(params, self.state_shardings.params)
        # The step donates the params, so this engine must own every buffer: an array the
        # caller passed through unmoved may be held elsewhere (another engine's, a PPO critic
        # started from the actor) or under two names (a DPO reference set to the policy), so
        # it is copied; arrays device_put made are this engine's already.
        own = lambda x: jnp.copy(x) if id(x) in given else x
        self.state = self.state._replace(params=jax.tree.map(own, params))

    def model(self) -> nnx.Module:
        """The module with the current params (for inspection; arrays stay sharded)."""
        return nnx.merge(self.graphdef, self.state.params, self.state.model_state)

    # ---- checkpoints ---------------------------------------------------------------------
    def save_checkpoint(self, save_dir: str, tag: str | None = None, client_state: dict | None = None,
                        *, async_save: bool | None = None) -> str:
        """Save params, optimizer state, step counters, loss scale and `client_state` (JSON).

        DeepSpeed's semantics: the tag defaults to `global_step{N}` and `latest` names the
        newest complete checkpoint. Call it on every process. With `async_save` training
        goes on while the files are written; `latest` moves when they are complete.
        """
        train_cfg = self.config.zerojax.train
        tag = tag if tag is not None else f"global_step{self.global_steps}"
        client_state = dict(client_state or {})
        try:
            json.dumps(client_state)
        except TypeError as e:
            raise CheckpointError(f"client_state must be JSON-serialisable (it is stored as JSON, "
                                  f"never pickled): {e}") from None
        # The plain run's optax tree also under NVMe offload, so checkpoints move between them.
        opt_state = self.nvme.canonical_opt_state() if self.nvme is not None else self.state.opt_state
        state = {"params": checkpoint.to_nested(self.state.params),
                 "train": {"opt_state": checkpoint.to_nested(opt_state),
                           "step": self.state.step,
                           "loss_scale": checkpoint.to_nested(self.state.loss_scale),
                           "model_state": checkpoint.to_nested(self.state.model_state)}}
        meta = {"format": checkpoint.FORMAT_VERSION, "tag": tag, "global_steps": self.global_steps,
                "params": checkpoint.shapes_of(checkpoint.to_nested(self.state.params)),
                "opt_state": checkpoint.shapes_of(checkpoint.to_nested(opt_state)),
                "fp16": self.config.fp16.enabled, "model": self.model_section,
                "client_state": client_state}
        if self._saver is None:
            self._saver = checkpoint.Saver()
        return self._saver.save(
            save_dir, tag, state, meta,
            async_save=bool(train_cfg.get("async_checkpointing", False) if async_save is None else async_save),
            max_to_keep=train_cfg.get("max_to_keep"), keep_every=train_cfg.get("keep_every"))

    def wait_for_checkpoint(self) -> None:
        """Block until an asynchronous save has finished and `latest` names it."""
        if self._saver is not None:
            self._saver.wait()

    def load_checkpoint(self, load_dir: str, tag: str | None = None, load_optimizer_states: bool = True,
                        load_module_only: bool = False) -> tuple[str, dict]:
        """Restore onto this engine's layout (any device count, mesh or ZeRO stage).

        Returns `(path, client_state)`. With `load_module_only` (or without optimizer
        states) only the params are read; optimizer state and step counters stay as the
        engine has them (fresh, for an engine just built), as in DeepSpeed.
        """
        self.wait_for_checkpoint()
        tag = checkpoint.resolve_tag(load_dir, tag)
        where = os.path.join(load_dir, tag)
        meta = checkpoint.read_meta(load_dir, tag)
        checkpoint.check_params_match(meta, checkpoint.to_nested(self.state.params), where)
        abstract = lambda tree, shardings: jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, shardings)
        target = {"params": checkpoint.to_nested(abstract(self.state.params, self.state_shardings.params))}
        full = load_optimizer_states and not load_module_only
        # Under NVMe offload the checkpoint holds the plain run's optax tree (zerojax.nvme).
        opt_like, opt_shardings = ((self.nvme.canonical_abstract, self.nvme.canonical_shardings)
                                   if self.nvme is not None else
                                   (self.state.opt_state, self.state_shardings.opt_state))
        if full:
            if meta["opt_state"] != checkpoint.shapes_of(checkpoint.to_nested(opt_like)):
                raise CheckpointError(
                    f"checkpoint {where} holds optimizer state of another optimizer or model; "
                    f"load it with load_optimizer_states=False to start the optimizer fresh")
            train = {"opt_state": checkpoint.to_nested(abstract(opt_like, opt_shardings)),
                     "step": abstract(self.state.step, self.state_shardings.step),
                     "model_state": checkpoint.to_nested(abstract(self.state.model_state,
                                                                  self.state_shardings.model_state))}
            if meta["fp16"] and self.config.fp16.enabled:   # a loss scale only means something in fp16
                train["loss_scale"] = checkpoint.to_nested(abstract(self.state.loss_scale,
                                                                    self.state_shardings.loss_scale))
            target["train"] = train
        restored = checkpoint.restore(load_dir, tag, target)
        new = {"params": checkpoint.from_nested(self.state.params, restored["params"])}
        if full:
            train = restored["train"]
            new["opt_state"] = checkpoint.from_nested(opt_like, train["opt_state"])
            if self.nvme is not None:      # into the files; the state keeps the scalars
                new["opt_state"] = self.nvme.load(new["opt_state"], steps=int(train["step"]))
            new["step"] = train["step"]
            new["model_state"] = checkpoint.from_nested(self.state.model_state, train["model_state"])
            if "loss_scale" in train:
                new["loss_scale"] = checkpoint.from_nested(self.state.loss_scale, train["loss_scale"])
            self.global_steps = int(meta["global_steps"])
        self.state = self.state._replace(**new)
        return where, meta["client_state"]

    def lower_train_step(self, batch: Mapping[str, Any] | None = None):
        """The step lowered for a batch shape (the example batch by default); nothing runs."""
        return self._train_step.lower(self.state, self._abstract_batch(batch))

    def _abstract_batch(self, batch: Mapping[str, Any] | None) -> dict[str, jax.ShapeDtypeStruct]:
        batch = batch if batch is not None else self._example_batch
        if batch is None:
            raise ValueError("memory_report needs a batch shape: pass example_batch= to initialize, "
                             "run a train_step first, or pass batch=")
        return {
            k: jax.ShapeDtypeStruct((self.batch_sizes.train_batch_size, *np.shape(v)[1:]),
                                    getattr(v, "dtype", None) or np.asarray(v).dtype,
                                    sharding=self.batch_sharding(len(np.shape(v))))
            for k, v in batch.items()}

    def memory_report(self, batch: Mapping[str, Any] | None = None) -> dict[str, int]:
        """Per-device bytes: params, grads, optimizer, temp (compiler), arguments, total, host.

        params/grads/optimizer come from the shardings; temp and arguments from the
        compiler. Gradients live inside temp (made and consumed within the step), so
        total = params + optimizer + temp: device memory. `host` is the state kept in host
        memory per device: with ZeRO-Offload the optimizer state (and the params with
        `offload_param`, or the fp32 masters under bf16/fp16), which `optimizer` and
        `params` (device bytes) then leave out, as DeepSpeed counts offloaded state as CPU
        memory. With NVMe offload `optimizer` is the optimizer's scalars alone and `nvme` the
        state in files, per device (zerojax.nvme).
        """
        analysis = self._compiled("train", self._abstract_batch(batch)).memory_analysis()
        params = _bytes_per_device(self.state.params, self.state_shardings.params)
        optimizer = _bytes_per_device(self.state.opt_state, self.state_shardings.opt_state)
        host = 0
        if self.offload_memory_kind is not None:
            optimizer, host = 0, optimizer
        if self.param_memory_kind is not None:
            params, host = 0, host + params
        grads = _bytes_per_device(self._abstract_params, self.layout.shardings(self.layout.grads))
        temp = int(analysis.temp_size_in_bytes)
        report = {"params": params, "grads": grads, "optimizer": optimizer, "temp": temp,
                  "arguments": int(analysis.argument_size_in_bytes),
                  "total": params + optimizer + temp, "host": host}
        if self.nvme is not None:
            report["nvme"] = self.nvme.bytes_per_device
        return report


def initialize(model: nnx.Module | None = None, config: Any = None, *,
               model_fn: Callable[[nnx.Rngs], nnx.Module] | None = None,
               optimizer: optax.GradientTransformation | None = None,
               example_batch: Mapping[str, Any] | None = None, devices=None,
               abstract: bool = False) -> Engine:
    """Build an Engine from a module (or `model_fn(rngs)`) and a DeepSpeed config (dict or path).

    `abstract=True` creates no arrays: the state is ShapeDtypeStructs with their
    shardings, enough for `memory_report()` and ahead-of-time compilation of any size.
    """
    if config is None:
        raise ConfigError("initialize() needs config= (a DeepSpeed JSON dict or a path to one)")
    return Engine(config=Config.load(config), model=model, model_fn=model_fn, optimizer=optimizer,
                  example_batch=example_batch, devices=devices, abstract=abstract)
