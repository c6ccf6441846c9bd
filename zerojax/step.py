"""The pure train step: micro-batch scan, loss scaling, clipping, update, overflow skip.

Everything here is traced once into one SPMD program by the engine; shardings come in
as spec trees from `partition.StateLayout`, so this file knows nothing about meshes
beyond "constrain this tree to that layout".
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from zerojax import block_remat, buckets, compute, dot_forms, offload, precision
from zerojax.precision import LossScaleState


class TrainState(NamedTuple):
    """Everything a step reads and writes; a pytree of jax.Arrays."""

    params: Any                 # pure dict of fp32 master params
    opt_state: Any              # optax state
    step: jax.Array             # int32: optimizer steps applied so far
    loss_scale: LossScaleState
    model_state: Any            # the module's non-param variables (pure dict), e.g. RNG counters


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """What the step needs besides the state; fixed per compiled program."""

    graphdef: Any
    tx: optax.GradientTransformation
    lr_fn: Callable[[jax.Array], jax.Array]
    policy: compute.ComputePolicy
    grad_specs: Any                      # PartitionSpec tree for gradients (ZeRO-2: sharded)
    micro_batches: int
    gradient_clipping: float
    fp16: bool
    config: Any                          # zerojax.Config, for the loss-scaler rules
    cast_params_whole: bool              # the model does not cast per layer itself
    logical: Any = None                  # logical axis names of the params (pipeline stage split)
    pipeline_schedule: str | None = None  # "1f1b" | "gpipe" when the mesh has pipe > 1
    # ZeRO-Offload: device-memory shardings the host-resident optimizer state is moved to
    # for the update (the step's out_shardings put it back on the host); None: no offload.
    opt_state_on_device: Any = None
    # ... and the host-resident params (offload_param, or fp32 masters offloaded with the
    # optimizer under bf16/fp16), moved to the device for the step; None: params on device.
    params_on_device: Any = None
    # Update offloaded state one layer at a time (element-wise optimizers only).
    stream_offloaded_update: bool = False
    # The stored params' specs when ZeRO-3 gathers per layer in a 16-bit compute dtype:
    # the step casts the shards before any gather; None: no such cast.
    cast_shards_first: Any = None
    # ZeRO-3 gathering the params once for the whole step (`buckets.gathers_whole_step`):
    # the specs they are brought to before the module runs; None: gathered per layer.
    gathered_specs: Any = None
    # A user's module: the checkpoint policy each of its repeated blocks runs under
    # (zerojax.block_remat); None: no per-block remat.
    block_remat: Any = None
    # A checkpoint policy over the whole loss, for modules that do not remat per layer
    # themselves (a user's module); None: none.
    whole_model_remat: Any = None
    # Flat-bucket collectives (zerojax.buckets): the step's forward and backward passes run
    # per device inside a shard_map, params and gradients moving one bucket at a time;
    # None: XLA places the collectives. `inside_buckets`: this spec is the per-device one.
    bucket_plan: Any = None
    inside_buckets: bool = False
    # Rewrite the gradient function's dots into the operand form XLA:CPU's GEMM fusions take
    # (zerojax.dot_forms); the engine sets it for every step on CPU.
    gemm_form_dots: bool = False
    # Accumulate bf16 x bf16 dots in fp32 (zerojax.dot_forms: XLA:CPU's bf16-result dots are
    # slower); the engine sets it for bf16 steps on CPU.
    bf16_dots_in_f32: bool = False


def _constrain(tree: Any, specs: Any, mesh) -> Any:
    if mesh is None:        # per device, inside a bucketed step
        return tree
    return jax.tree.map(lambda x, s: jax.lax.with_sharding_constraint(x, NamedSharding(mesh, s)),
                        tree, specs, is_leaf=lambda x: isinstance(x, PartitionSpec) or x is None)


def model_loss(spec: StepSpec, params: Any, model_state: Any, batch: Any):
    """Run the module on one batch under the compute policy; returns (loss_f32, (metrics, new_model_state))."""
    def run(params, model_state, batch):
        with compute.use(spec.policy):
            if spec.inside_buckets:
                # Cast the shards before the gather: 16-bit buckets move half the bytes, and
                # the gradients are reduced in 16 bits as the unbucketed step (and DeepSpeed) does.
                if spec.cast_params_whole or spec.cast_shards_first is not None:
                    params = jax.tree.map(compute.cast, params)
                params = buckets.gather(spec.bucket_plan, params)
            elif spec.cast_params_whole:
                params = jax.tree.map(compute.cast, params)
            elif spec.cast_shards_first is not None:
                # ZeRO-3 in 16 bits: cast each stored shard where it lies, so the per-layer
                # all-gathers move 16-bit values (as DeepSpeed's do) rather than fp32 masters.
                params = _constrain(jax.tree.map(compute.cast, params), spec.cast_shards_first,
                                    spec.policy.mesh)
            if spec.gathered_specs is not None:
                params = _constrain(params, spec.gathered_specs, spec.policy.mesh)
            model = nnx.merge(spec.graphdef, params, model_state)
            if spec.cast_params_whole:
                precision.compute_in(model, spec.policy.dtype)
            if spec.block_remat is not None:
                block_remat.remat_blocks(model, spec.block_remat)
            out = model(batch)
            loss, metrics = out if isinstance(out, tuple) else (out, {})
            _, _, new_model_state = nnx.split(model, nnx.Param, ...)
        return jnp.asarray(loss, jnp.float32), (metrics, nnx.to_pure_dict(new_model_state))

    if spec.whole_model_remat is not None:
        run = jax.checkpoint(run, policy=spec.whole_model_remat)
    return run(params, model_state, batch)


def split_micro_batches(batch: Any, micro_batches: int) -> Any:
    """[B, ...] -> [M, B/M, ...] with row r in micro-batch r % M.

    This keeps each device's rows on that device (no all-to-all) and assigns rows to
    micro-batches the same way whatever the device count.
    """
    def split(x):
        rows = x.shape[0]
        return x.reshape(rows // micro_batches, micro_batches, *x.shape[1:]).swapaxes(0, 1)

    return jax.tree.map(split, batch)


def accumulate_gradients(spec: StepSpec, state: TrainState, batch: Any):
    """Mean loss and summed scaled gradients over the micro-batches, in one scan."""
    if spec.bucket_plan is not None and not spec.inside_buckets:
        return bucketed_gradients(spec, state, batch)
    scale = state.loss_scale.scale

    def scaled_loss(params, model_state, micro_batch):
        loss, aux = model_loss(spec, params, model_state, micro_batch)
        return loss * scale, (loss, aux)

    grad_fn = jax.value_and_grad(scaled_loss, has_aux=True)
    if spec.gemm_form_dots or spec.bf16_dots_in_f32:
        grad_fn = dot_forms.in_gemm_form(grad_fn, gemm_form=spec.gemm_form_dots,
                                         bf16_in_f32=spec.bf16_dots_in_f32)
    mesh = spec.policy.mesh

    def one(model_state, micro_batch):
        (_, (loss, (metrics, model_state))), grads = grad_fn(state.params, model_state, micro_batch)
        return _constrain(grads, spec.grad_specs, mesh), loss, metrics, model_state

    if spec.pipeline_schedule is not None:
        from zerojax import pipeline
        with compute.use(spec.policy):
            loss, grads = pipeline.loss_and_grads(
                graphdef=spec.graphdef, model_state=state.model_state, params=state.params,
                micro=split_micro_batches(batch, spec.micro_batches), logical=spec.logical,
                mesh=mesh, schedule=spec.pipeline_schedule, micro_batches=spec.micro_batches,
                scale=scale, cast_whole=spec.cast_params_whole)
        return _constrain(grads, spec.grad_specs, mesh), loss, {}, state.model_state

    if spec.micro_batches == 1:
        grads, loss, metrics, model_state = one(state.model_state, batch)
        return grads, loss, metrics, model_state

    micro = split_micro_batches(batch, spec.micro_batches)
    zeros = _constrain(jax.tree.map(jnp.zeros_like, state.params), spec.grad_specs, mesh)

    def body(carry, micro_batch):
        acc, model_state = carry
        grads, loss, metrics, model_state = one(model_state, micro_batch)
        acc = jax.tree.map(jnp.add, acc, grads)
        return (acc, model_state), (loss, metrics)

    (grads, model_state), (losses, metrics) = jax.lax.scan(body, (zeros, state.model_state), micro)
    return grads, jnp.mean(losses), jax.tree.map(jnp.mean, metrics), model_state


def bucketed_gradients(spec: StepSpec, state: TrainState, batch: Any):
    """`accumulate_gradients` with flat-bucket collectives: each device runs the micro-batch
    loop on its own rows inside a shard_map over the data axis (see zerojax.buckets)."""
    plan, mesh = spec.bucket_plan, spec.policy.mesh
    axis = buckets.AXIS
    local = dataclasses.replace(
        spec, inside_buckets=True, grad_specs=None,
        policy=dataclasses.replace(spec.policy, mesh=None, gather_params=False, rows_axis=axis))
    params_in = plan.stored_specs(state.params)

    def per_device(params, model_state, scale, batch):
        # A whole (replicated) param meeting per-device rows would get its gradient
        # all-reduced by autodiff, one collective per leaf: mark them per-device first and
        # reduce their gradients in buckets below.
        leaves, treedef = jax.tree.flatten(params)
        leaves = [x if d is not None else jax.lax.pcast(x, axis, to="varying") for x, d in zip(leaves, plan.stored_dims)]
        mine = TrainState(params=jax.tree.unflatten(treedef, leaves), opt_state=None, step=None,
                          loss_scale=LossScaleState(scale=scale, since_overflow=None, hysteresis=None),
                          model_state=model_state)
        grads, loss, metrics, model_state = accumulate_gradients(local, mine, batch)
        grads = buckets.reduce_whole_leaves(plan, grads)
        if _varies(loss, axis):
            # The loss is this device's rows' own (a user's module): average as DDP does.
            loss = jax.lax.pmean(loss, axis)
            grads = jax.tree.map(lambda g: g / plan.devices, grads)
        metrics = jax.tree.map(lambda m: _to_invariant(m, axis), metrics)
        model_state = jax.tree.map(lambda m: _to_invariant(m, axis), model_state)
        return grads, loss, metrics, model_state

    # (A bare PartitionSpec() stands for every leaf of its subtree: the model state and metrics.)
    return jax.shard_map(
        per_device, mesh=mesh,
        in_specs=(params_in, PartitionSpec(), PartitionSpec(), PartitionSpec(axis)),
        out_specs=(spec.grad_specs, PartitionSpec(), PartitionSpec(), PartitionSpec()),
    )(state.params, state.model_state, state.loss_scale.scale, batch)


def _varies(x: jax.Array, axis: str) -> bool:
    """Whether a value inside the shard_map may differ between the devices of `axis`."""
    return axis in jax.typeof(x).manual_axis_type.varying


def _to_invariant(x: jax.Array, axis: str) -> jax.Array:
    """A per-device value made the same on every device: floats averaged, integers the max."""
    if not _varies(x, axis):
        return x
    return jax.lax.pmean(x, axis) if jnp.issubdtype(x.dtype, jnp.inexact) else jax.lax.pmax(x, axis)


def params_for_step(spec: StepSpec, params: Any) -> Any:
    """The params in device memory (a no-op unless they are offloaded to the host)."""
    if spec.params_on_device is None:
        return params
    return jax.device_put(params, spec.params_on_device)


def apply_optimizer(spec: StepSpec, grads: Any, opt_state: Any, params: Any, device_params: Any,
                    overflow: jax.Array) -> tuple[Any, Any]:
    """New (params, optimizer state), the old ones kept on overflow.

    `params` are the state's (maybe on the host), `device_params` their device copies the
    forward used. Offloaded state is streamed layer by layer when the optimizer allows
    (`stream_offloaded_update`), else moved to the device whole for the update."""
    if spec.stream_offloaded_update:
        return offload.streamed_update(
            spec.tx, grads, opt_state, params, logical=spec.logical, overflow=overflow,
            state_on_host=spec.opt_state_on_device is not None,
            params_on_host=spec.params_on_device is not None)
    if spec.opt_state_on_device is not None:
        opt_state = jax.device_put(opt_state, spec.opt_state_on_device)
    if spec.bucket_plan is not None:
        # Update each param where its gradient and optimizer state lie (a local slice of a
        # param kept whole), then re-gather those kept whole one bucket at a time.
        device_params = _constrain(device_params, spec.grad_specs, spec.policy.mesh)
    updates, new_opt_state = spec.tx.update(grads, opt_state, device_params)
    new_params = optax.apply_updates(device_params, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(overflow, o, n), new, old)
    new_params = keep(new_params, device_params)
    if spec.bucket_plan is not None:
        new_params = buckets.regather(spec.bucket_plan, spec.policy.mesh, new_params)
    return new_params, keep(new_opt_state, opt_state)


def unscale_and_clip(spec: StepSpec, state: TrainState, grads: Any) -> tuple[Any, jax.Array, jax.Array]:
    """(grads, their global norm, fp16 overflow) from the summed, loss-scaled grads of
    `spec.micro_batches` micro-batches: unscaled and averaged (DeepSpeed divides the loss
    by gas), clipped by the global norm as DeepSpeed clips."""
    grads = jax.tree.map(lambda g: g / (state.loss_scale.scale * spec.micro_batches), grads)
    grad_norm = (optax.tree.norm(grads) if spec.bucket_plan is None
                 else buckets.global_norm(spec.bucket_plan, spec.policy.mesh, grads))
    if spec.gradient_clipping > 0:
        # DeepSpeed: clip_coef = max_norm / (norm + 1e-6), applied only when < 1.
        coef = spec.gradient_clipping / (grad_norm + 1e-6)
        grads = jax.tree.map(lambda g: g * jnp.minimum(coef, 1.0), grads)
    overflow = ~jnp.isfinite(grad_norm) if spec.fp16 else jnp.asarray(False)
    return grads, grad_norm, overflow


def advance(spec: StepSpec, state: TrainState, grad_norm: jax.Array, overflow: jax.Array
            ) -> tuple[jax.Array, Any, dict]:
    """(new step count, new loss scale, the step's metrics): an overflowing step is not counted."""
    step = state.step + jnp.where(overflow, 0, 1).astype(jnp.int32)
    metrics = {"grad_norm": grad_norm, "lr": jnp.asarray(spec.lr_fn(state.step), jnp.float32),
               "loss_scale": state.loss_scale.scale, "skipped": overflow, "step": step}
    return step, precision.update_loss_scale(state.loss_scale, overflow, spec.config), metrics


def apply_accumulated(spec: StepSpec, state: TrainState, grads: Any,
                      device_params: Any = None) -> tuple[TrainState, dict]:
    """The optimizer step from the summed, loss-scaled grads of `spec.micro_batches` micro-batches:
    `unscale_and_clip`, update (the old values kept on an fp16 overflow), `advance`.
    `state.params` are the stored ones (maybe on the host); `device_params` their device
    copies when the caller has them already. Returns the new state (model_state
    untouched) and the step's metrics."""
    if device_params is None:
        device_params = params_for_step(spec, state.params)
    grads, grad_norm, overflow = unscale_and_clip(spec, state, grads)
    new_params, new_opt_state = apply_optimizer(spec, grads, state.opt_state, state.params,
                                                device_params, overflow)
    step, loss_scale, metrics = advance(spec, state, grad_norm, overflow)
    return state._replace(params=new_params, opt_state=new_opt_state, step=step,
                          loss_scale=loss_scale), metrics


def train_step(spec: StepSpec, state: TrainState, batch: Any) -> tuple[TrainState, dict]:
    on_device = state._replace(params=params_for_step(spec, state.params))
    grads, loss, model_metrics, model_state = accumulate_gradients(spec, on_device, batch)
    new_state, metrics = apply_accumulated(spec, state, grads, on_device.params)
    metrics = {"loss": loss, **metrics,
               **{k: jnp.asarray(v, jnp.float32) for k, v in model_metrics.items()}}
    return new_state._replace(model_state=model_state), metrics


def eval_loss(spec: StepSpec, state: TrainState, batch: Any) -> jax.Array:
    loss, _ = model_loss(spec, params_for_step(spec, state.params), state.model_state, batch)
    return loss
