"""ZeRO-Infinity: the optimizer state in files under `nvme_path`, updated sub-group by sub-group.

DeepSpeed's `zero_optimization.offload_optimizer: {"device": "nvme", "nvme_path": DIR}`.

**Where the state lives.** The trained params' leaves are concatenated, in tree order,
into flat vectors, one per weight-decay group (`"zerojax": {"weight_decay_mask":
"no_bias_norm"}` gives a decayed and an undecayed group) and dtype, and each vector is cut
into sub-groups of `zero_optimization.sub_group_size` elements (DeepSpeed's default 1e9:
one sub-group per group). The optimizer's per-element state (Adam's two moments, SGD's
momentum, ...) is kept in files, one per group and state tensor, each holding its
sub-groups back to back (the last one padded). None of it stays in memory: during a step
host RAM holds `buffer_count` sub-groups' state (preallocated buffers, kept) plus the
device-side inputs and outputs of the one being updated. The optimizer's scalars (step counts, the learning rate and betas of
`optax.inject_hyperparams`) are tiny and stay in `engine.state.opt_state`: a dict
`{path name: replicated jax.Array}`. The params stay where they were, in
`engine.state.params` on the devices, in the ZeRO stage's layout.

**A step.** One compiled program computes the loss and the gradients (micro-batch scan,
loss scaling, clipping and the fp16 overflow check exactly as the plain step) and
returns them in the ZeRO-sharded layout, without an optimizer update. Then, for each
sub-group: its state is read from the files (with `pipeline_read` the next sub-groups'
reads overlap this one's update, on `aio.thread_count` I/O threads), the params and
gradients of its elements are copied from the leaves, one compiled update function (the
same program for every sub-group of a group: the last, shorter one is padded) applies the
optimizer to the flat vectors, the new state is written back (with `pipeline_write`
overlapped with the next update) and the new params are copied into the leaves they came
from. A leaf whose elements are all updated goes back to the devices in its sharding at
once, and its old param and gradient buffers are freed, so memory holds about one copy of
the params and one of the gradients. Updates run on the host CPU (DeepSpeed's CPU Adam
does the same), with `jax.devices("cpu")`. An fp16 step that overflows reads and writes
nothing.

**The optimizer must be elementwise**: the update of an element may depend only on that
element's param, gradient and state and on the shared scalars (Adam, AdamW, SGD, Lion,
Adagrad). LAMB's per-tensor trust ratio is not, and is refused with a ConfigError; an
optax transformation passed as `optimizer=` is checked on a small example (updates of a
two-leaf tree and of its concatenation must agree).

**Crash safety.** The files exist twice, in `slot0/` and `slot1/`. Step N+1 reads the
slot `manifest.json` names and writes the other; only when every sub-group is written does
a new manifest (written to a temporary file, then `os.replace`) name the new slot. A
process killed at any moment leaves a directory whose manifest names a complete state
(the last finished step). Checkpoints are separate from `nvme_path`: `save_checkpoint`
writes the optimizer state into the orbax checkpoint in the same canonical optax tree a
plain run has, so a checkpoint never depends on these files, restores into a
non-offloaded run, and a plain run's checkpoint restores into an NVMe run (its state is
written to the files). Each engine works in its own directory
`nvme_path/zerojax-optimizer-PID-N/`, locked (flock) while the engine lives and removed
when it is garbage-collected or the interpreter exits; a new engine removes the
directories of dead processes (their lock is free) under the same `nvme_path`.
Files are not fsynced: the working state survives a process kill, not a power loss (the
checkpoint is what a run resumes from either way). A step that fails half-way in-process
(an I/O error, a full disk) leaves the files at the last step but the params partly
updated: the engine then refuses to step until `load_checkpoint` restores both.

**Memory.** Besides the params, the gradients and the buffers above, a step holds the
leaves it is rebuilding: a host copy of the new values and, while it goes to the devices,
the device copy (on multi-device meshes also host copies of the old param and gradient,
gathered from their shards) — a few times the largest leaf, which for stacked-layer models
is one of the layer matrices of all layers. glibc keeps freed heap pages and the step
frees and allocates leaf-sized buffers all along, so it gives freed pages back
(`malloc_trim`) after each finished leaf; without that peak RSS crept up step after step.
`memory_report()["optimizer"]` counts only the scalars on the device; `["nvme"]` is the
state in files per device (the whole state divided by the process's device count, as a
ZeRO-1 run would shard it).

**Left out.** Multi-process runs and pipeline parallelism are refused with a ConfigError
(each process would need its own part of the flat groups; pipeline stages their own);
params on NVMe (`offload_param.device "nvme"`) are refused by the config. Saving and
loading a checkpoint hold the whole optimizer state in device memory for the moment of
the save (the canonical tree), as a plain run does. libaio / GPUDirect knobs of DeepSpeed's
`aio` section (queue_depth, single_submit, overlap_events, use_gds) have no counterpart in
plain file I/O and are warned by name; `pin_memory` has no effect here (warned).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import fcntl
import functools
import itertools
import json
import math
import os
import queue
import shutil
import threading
import weakref
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from zerojax import checkpoint, host_memory, offload, precision
from zerojax.config import Config, ConfigError
from zerojax.step import StepSpec, TrainState, accumulate_gradients, advance, params_for_step, unscale_and_clip

DIR_PREFIX = "zerojax-optimizer-"
MANIFEST = "manifest.json"
FORMAT = 1
_SECTION = "zero_optimization.offload_optimizer"
_counter = itertools.count()


def enabled(config: Config) -> bool:
    return config.zero_optimization.offload_optimizer.device == "nvme"


# ---- the compiled gradient step -------------------------------------------------------------

class Gradients(NamedTuple):
    """What the gradient step hands to the host update: everything but params and optimizer."""

    grads: Any            # trained params' gradients: unscaled, averaged, clipped
    step: jax.Array
    loss_scale: precision.LossScaleState
    model_state: Any


def gradient_step(spec: StepSpec, trained: tuple[str, ...] | None, state: TrainState, batch: Any):
    """`step.train_step` up to the optimizer update: the same loss, gradients, clipping,
    overflow check, loss-scale update and metrics; the update itself runs on the host."""
    state = state._replace(params=params_for_step(spec, state.params))
    grads, loss, model_metrics, model_state = accumulate_gradients(spec, state, batch)
    grads, grad_norm, overflow = unscale_and_clip(spec, state, grads)
    if trained is not None:
        grads = {k: grads[k] for k in trained}
    new_step, loss_scale, metrics = advance(spec, state, grad_norm, overflow)
    out = Gradients(grads=grads, step=new_step, loss_scale=loss_scale, model_state=model_state)
    metrics = {"loss": loss, **metrics, **{k: jnp.asarray(v, jnp.float32) for k, v in model_metrics.items()}}
    return out, metrics


# ---- file I/O -------------------------------------------------------------------------------

def _pread_into(fd: int, buffer: np.ndarray, offset: int, block: int) -> None:
    view = memoryview(buffer).cast("B")
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:done + block]], offset + done)
        if n <= 0:
            raise OSError(f"short read at byte {offset + done}: the NVMe state file is truncated")
        done += n


def _pwrite_from(fd: int, data: np.ndarray, offset: int, block: int) -> None:
    view = memoryview(np.ascontiguousarray(data)).cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:done + block], offset + done)


def _to_host(x: jax.Array) -> np.ndarray:
    """A leaf's values on the host, flat. Assembled from its shards rather than with
    `np.asarray(x)`, which keeps the assembled copy cached on a multi-device array."""
    if len(x.sharding.device_set) == 1:
        return np.asarray(x).reshape(-1)
    out = np.empty(x.shape, x.dtype)
    for shard in x.addressable_shards:
        if shard.replica_id == 0:
            out[shard.index] = np.asarray(shard.data)
    return out.reshape(-1)


def _write_json_atomic(path: str, value: Any) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(value, f)
    os.replace(tmp, path)


def _alive(name: str) -> bool:
    try:
        os.kill(int(name[len(DIR_PREFIX):].split("-")[0]), 0)
    except ProcessLookupError:
        return False
    except (ValueError, OSError):
        return True         # not ours to judge (another user's process, an odd name)
    return True


def _claim_directory(nvme_path: str) -> tuple[str, int]:
    """Create `nvme_path` if missing, remove dead engines' directories, make and lock ours."""
    where = f"{_SECTION}.nvme_path {nvme_path!r}"
    if os.path.exists(nvme_path) and not os.path.isdir(nvme_path):
        raise ConfigError(f"{where} is a file, not a directory; point nvme_path at a directory "
                          f"(it is created if missing) on a fast local disk")
    try:
        os.makedirs(nvme_path, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{where} cannot be created: {e.strerror or e}; point nvme_path at a "
                          f"writable directory on a fast local disk") from None
    for name in os.listdir(nvme_path):
        stale = os.path.join(nvme_path, name)
        if name.startswith(DIR_PREFIX) and os.path.isdir(stale):
            try:
                fd = os.open(os.path.join(stale, "lock"), os.O_RDWR)
            except FileNotFoundError:           # killed before it locked: its pid tells
                if not _alive(name):
                    shutil.rmtree(stale, ignore_errors=True)
                continue
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)            # a live engine's
                continue
            shutil.rmtree(stale, ignore_errors=True)    # its process is gone
            os.close(fd)
    directory = os.path.join(nvme_path, f"{DIR_PREFIX}{os.getpid()}-{next(_counter)}")
    try:
        os.makedirs(directory)
        fd = os.open(os.path.join(directory, "lock"), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ConfigError(f"{where} is not writable: {e.strerror or e}; point nvme_path at a "
                          f"directory this process can write") from None
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return directory, fd


def _release(directory: str, lock_fd: int, fds: list[int], pool) -> None:
    # The last reference may go in one of the pool's own threads, which cannot join itself.
    pool.shutdown(wait=not threading.current_thread().name.startswith("zerojax-nvme"))
    for fd in fds:
        os.close(fd)
    shutil.rmtree(directory, ignore_errors=True)
    os.close(lock_fd)


# ---- the layout of the flat groups ------------------------------------------------------------

@dataclasses.dataclass
class _Group:
    """Trained leaves (indices into the tree's leaves) sharing a decay flag and dtype."""

    decay: bool | None
    dtype: np.dtype
    leaves: list[int]
    offsets: list[int]          # each leaf's first element in the flat vector
    size: int                   # elements
    sub_size: int               # elements per sub-group
    count: int                  # sub-groups
    tx: Any = None
    update: Any = None          # compiled (params, grads, elems, scalars) -> new ones
    init: Any = None            # compiled params -> (elems, scalars)
    chunks: Any = None          # host staging of one sub-group's params and gradients


def _check_elementwise(tx: optax.GradientTransformation) -> None:
    """A user's transformation on a two-leaf tree and on its concatenation must agree."""
    rng = np.random.default_rng(0)
    shapes = {"a": (3,), "b": (2, 2)}
    params = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    flat = lambda tree: np.concatenate([np.asarray(tree[k]).ravel() for k in shapes])
    tree_state, flat_state = tx.init(params), tx.init(flat(params))
    for _ in range(2):
        grads = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
        tree_updates, tree_state = tx.update(grads, tree_state, params)
        flat_updates, flat_state = tx.update(flat(grads), flat_state, flat(params))
        if not np.allclose(flat(tree_updates), np.asarray(flat_updates), rtol=1e-5, atol=1e-7):
            raise ValueError("its update of a tensor depends on more than that tensor's elements")


class NvmeOptimizer:
    """The optimizer state of one engine in files; see the module docstring."""

    def __init__(self, *, config: Config, mesh, abstract_params: dict, param_shardings: dict,
                 trained: tuple[str, ...] | None, decay_mask: Any, canonical_abstract: Any,
                 canonical_shardings: Any, optimizer: optax.GradientTransformation | None,
                 create_files: bool = True):
        from zerojax import optim

        section = config.zero_optimization.offload_optimizer
        if jax.process_count() > 1:
            raise ConfigError(f'{_SECTION}.device "nvme" runs in a single process; this run has '
                              f"{jax.process_count()} (use device \"cpu\" for multi-process runs)")
        if mesh.shape.get("pipe", 1) > 1:
            raise ConfigError(f'{_SECTION}.device "nvme" is not supported with pipeline parallelism '
                              f"(pipeline.stages {mesh.shape['pipe']}); use device \"cpu\" or no pipeline")
        if (optimizer is None and config.optimizer is not None
                and config.optimizer.type not in offload.ELEMENTWISE_OPTIMIZERS):
            raise ConfigError(f'{_SECTION}.device "nvme" updates the state sub-group by sub-group, '
                              f"which needs an elementwise optimizer; Lamb's per-tensor trust ratio "
                              f"is not. Use Adam/AdamW/SGD/Lion/Adagrad, or device \"cpu\"")
        self.config, self.mesh = config, mesh
        self.buffer_count = section.buffer_count
        self.pipeline_read, self.pipeline_write = section.pipeline_read, section.pipeline_write
        self.block_size = config.aio.block_size
        self.threads = max(config.aio.thread_count, config.aio.intra_op_parallelism)
        self.trained = trained
        trained_params = {k: abstract_params[k] for k in trained} if trained else abstract_params
        leaves, self.treedef = jax.tree.flatten(trained_params)
        self.shapes = [tuple(x.shape) for x in leaves]
        shardings = {k: param_shardings[k] for k in trained} if trained else param_shardings
        self.param_shardings = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
        masks = (jax.tree.leaves({k: decay_mask[k] for k in trained} if trained else decay_mask)
                 if decay_mask is not None and optimizer is None else [None] * len(leaves))
        try:
            self.update_device = jax.devices("cpu")[0]
        except RuntimeError:
            self.update_device = jax.devices()[0]

        # Groups: one per (decay flag, dtype), leaves in tree order.
        groups: dict[tuple, _Group] = {}
        for i, (leaf, decay) in enumerate(zip(leaves, masks)):
            if math.prod(leaf.shape) == 0:
                continue
            key = (None if decay is None else bool(decay), np.dtype(leaf.dtype))
            group = groups.setdefault(key, _Group(key[0], key[1], [], [], 0, 0, 0))
            group.leaves.append(i)
            group.offsets.append(group.size)
            group.size += math.prod(leaf.shape)
        sub_group_size = config.zero_optimization.sub_group_size
        self.groups = list(groups.values())
        if not self.groups:
            raise ConfigError(f'{_SECTION}.device "nvme": the model has no trained params to offload')
        if optimizer is not None:
            try:
                _check_elementwise(optim.build_optimizer(config, optimizer=optimizer))
            except Exception as e:
                raise ConfigError(f'{_SECTION}.device "nvme" applies the optimizer to flat sub-groups, '
                                  f"but the optimizer passed as optimizer= is not elementwise: {e}") from None
        for group in self.groups:
            group.sub_size = min(sub_group_size, group.size)
            group.count = -(-group.size // group.sub_size)
            group.tx = optim.build_optimizer(config, optimizer=optimizer, decay_mask=group.decay)

        # The state of one flat vector: which leaves are per element (in files), which scalars.
        probe = jax.ShapeDtypeStruct((self.groups[0].sub_size,), self.groups[0].dtype)
        flat_abstract = jax.eval_shape(self.groups[0].tx.init, probe)
        flat_leaves, self.state_treedef = jax.tree.flatten(flat_abstract)
        self.elementwise = []
        for leaf in flat_leaves:
            if leaf.shape == probe.shape:
                self.elementwise.append(True)
            elif leaf.shape == ():
                self.elementwise.append(False)
            else:
                raise ConfigError(f'{_SECTION}.device "nvme": the optimizer keeps state of shape '
                                  f"{leaf.shape} for a vector of {probe.shape[0]} elements; only "
                                  f"per-element state and scalars can be split into sub-groups")
        self.elem_dtypes = [np.dtype(x.dtype) for x, e in zip(flat_leaves, self.elementwise) if e]
        paths = [checkpoint.path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(flat_abstract)[0]]
        self.scalar_names = [n for n, e in zip(paths, self.elementwise) if not e]
        for group in self.groups[1:]:
            other = jax.eval_shape(group.tx.init, jax.ShapeDtypeStruct((group.sub_size,), group.dtype))
            if jax.tree.structure(other) != self.state_treedef:
                raise ConfigError(f'{_SECTION}.device "nvme": the optimizer state differs between '
                                  f"weight-decay groups; set zerojax.weight_decay_mask \"all\"")
        # The canonical (plain run's) tree: the flat structure with a param tree per element leaf.
        self.canonical_abstract = canonical_abstract
        self.canonical_shardings = canonical_shardings
        try:
            parts = self.state_treedef.flatten_up_to(canonical_abstract)
        except (ValueError, TypeError) as e:
            raise ConfigError(f'{_SECTION}.device "nvme": the optimizer state of the param tree does '
                              f"not match that of a flat vector ({e}); the optimizer is not elementwise") from None
        for part, elem in zip(parts, self.elementwise):
            if elem and [tuple(x.shape) for x in jax.tree.leaves(part)] != self.shapes:
                raise ConfigError(f'{_SECTION}.device "nvme": the optimizer state is not shaped like '
                                  f"the params; the optimizer is not elementwise")
        self.canonical_parts_shardings = self.state_treedef.flatten_up_to(canonical_shardings)

        replicated = NamedSharding(mesh, PartitionSpec())
        self.scalar_shardings = {n: replicated for n in self.scalar_names}
        scalars_abstract = [x for x, e in zip(flat_leaves, self.elementwise) if not e]
        self.abstract_scalars = {n: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated)
                                 for n, x in zip(self.scalar_names, scalars_abstract)}
        elem_bytes = sum(d.itemsize for d in self.elem_dtypes)
        self.state_bytes = sum(g.size for g in self.groups) * elem_bytes
        self.bytes_per_device = self.state_bytes // mesh.devices.size
        self.scalars: dict[str, np.ndarray] | None = None
        self.slot = 0
        self.steps = 0
        self.directory = None
        self.failed: str | None = None
        if create_files:
            self._create_files(config.zero_optimization.offload_optimizer.nvme_path)

    def jit_gradient_step(self, spec: StepSpec, state_shardings: TrainState, grad_shardings: Any,
                          metrics_sharding: NamedSharding):
        """The compiled part of a step: `gradient_step`, gradients out in `grad_shardings`
        (the ZeRO-sharded layout, so the host gathers each element once)."""
        if self.trained:
            grad_shardings = {k: grad_shardings[k] for k in self.trained}
        out = Gradients(grads=grad_shardings, step=state_shardings.step,
                        loss_scale=state_shardings.loss_scale, model_state=state_shardings.model_state)
        return jax.jit(functools.partial(gradient_step, spec, self.trained),
                       out_shardings=(out, metrics_sharding))

    # ---- setup ------------------------------------------------------------------------------
    def _create_files(self, nvme_path: str) -> None:
        nvme_path = os.path.abspath(os.path.expanduser(nvme_path))
        directory, lock_fd = _claim_directory(nvme_path)
        need = 2 * sum(g.count * g.sub_size for g in self.groups) * sum(d.itemsize for d in self.elem_dtypes)
        free = shutil.disk_usage(directory).free
        if need > free:
            shutil.rmtree(directory, ignore_errors=True)
            os.close(lock_fd)
            raise ConfigError(f"{_SECTION}.nvme_path {nvme_path!r}: the optimizer state needs "
                              f"{need / 2**30:.2f} GiB (two copies: the step writes a new one before "
                              f"the old is dropped), the disk has {free / 2**30:.2f} GiB free")
        self.directory = directory
        # fds[slot][group][state tensor]
        self.fds = []
        for slot in (0, 1):
            os.makedirs(os.path.join(directory, f"slot{slot}"))
            per_group = []
            for g, group in enumerate(self.groups):
                row = []
                for j, dtype in enumerate(self.elem_dtypes):
                    fd = os.open(os.path.join(directory, f"slot{slot}", f"group{g}_state{j}.bin"),
                                 os.O_RDWR | os.O_CREAT, 0o644)
                    os.ftruncate(fd, group.count * group.sub_size * dtype.itemsize)
                    row.append(fd)
                per_group.append(row)
            self.fds.append(per_group)
        self.pool = concurrent.futures.ThreadPoolExecutor(self.threads, thread_name_prefix="zerojax-nvme")
        every_fd = [fd for slot in self.fds for row in slot for fd in row]
        self._finalizer = weakref.finalize(self, _release, directory, lock_fd, every_fd, self.pool)
        self._buffers: queue.SimpleQueue | None = None

    def _arenas(self) -> queue.SimpleQueue:
        """`buffer_count` preallocated buffers, each holding one sub-group's state (at most as
        many as there are sub-groups); made on first use and kept."""
        if self._buffers is None:
            largest = max(g.sub_size for g in self.groups)
            count = min(self.buffer_count, sum(g.count for g in self.groups))
            self._buffers = queue.SimpleQueue()
            for _ in range(count):
                self._buffers.put([np.empty(largest, d) for d in self.elem_dtypes])
        return self._buffers

    def _compile(self, group: _Group) -> None:
        if group.update is not None:
            return
        elementwise, treedef, tx = self.elementwise, self.state_treedef, group.tx

        def merge(elems, scalars):
            e, s = iter(elems), iter(scalars)
            return treedef.unflatten([next(e) if is_elem else next(s) for is_elem in elementwise])

        def split(state):
            leaves = treedef.flatten_up_to(state)
            return (tuple(x for x, e in zip(leaves, elementwise) if e),
                    tuple(x for x, e in zip(leaves, elementwise) if not e))

        def update(params, grads, elems, scalars):
            updates, new_state = tx.update(grads, merge(elems, scalars), params)
            return (optax.apply_updates(params, updates), *split(new_state))

        def init(params):
            return split(tx.init(params))

        # Inputs are committed to the update device, so the programs run there.
        group.update = jax.jit(update)
        group.init = jax.jit(init)

    # ---- gathering a sub-group's params and gradients from the leaves --------------------------
    def _spans(self, group: _Group, k: int):
        """(leaf index, start within the leaf, end within the leaf, start within the sub-group)."""
        lo, hi = k * group.sub_size, min((k + 1) * group.sub_size, group.size)
        for leaf, offset in zip(group.leaves, group.offsets):
            size = math.prod(self.shapes[leaf])
            if offset + size <= lo or offset >= hi:
                continue
            a, b = max(lo, offset), min(hi, offset + size)
            yield leaf, a - offset, b - offset, a - lo

    def _device(self, array: np.ndarray) -> jax.Array:
        return jax.device_put(array, self.update_device)

    # ---- initial state ---------------------------------------------------------------------------
    def initialize(self, params: Any) -> dict[str, jax.Array]:
        """Write the optimizer's initial state (of these params) to slot 0; return the scalars."""
        tree = {k: params[k] for k in self.trained} if self.trained else params
        leaves = self.treedef.flatten_up_to(tree)
        host: dict[int, np.ndarray] = {}        # leaves being read, gathered one at a time
        scalars = None
        for g, group in enumerate(self.groups):
            self._compile(group)
            for k in range(group.count):
                chunk = np.zeros(group.sub_size, group.dtype)
                for leaf, a, b, at in self._spans(group, k):
                    if leaf not in host:
                        host[leaf] = _to_host(leaves[leaf])
                    chunk[at:at + b - a] = host[leaf][a:b]
                    if b == host[leaf].size:
                        del host[leaf]
                elems, new_scalars = group.init(self._device(chunk))
                scalars = scalars or new_scalars
                for j, elem in enumerate(elems):
                    _pwrite_from(self.fds[0][g][j], np.asarray(elem),
                                 k * group.sub_size * self.elem_dtypes[j].itemsize, self.block_size)
        self.scalars = {n: np.asarray(x) for n, x in zip(self.scalar_names, scalars)}
        self.slot, self.steps = 0, 0
        self._write_manifest()
        return self.device_scalars()

    def device_scalars(self) -> dict[str, jax.Array]:
        return {n: jax.device_put(v, self.scalar_shardings[n]) for n, v in self.scalars.items()}

    def _write_manifest(self) -> None:
        _write_json_atomic(os.path.join(self.directory, MANIFEST), {
            "format": FORMAT, "slot": self.slot, "step": self.steps,
            "groups": [{"size": g.size, "sub_group_size": g.sub_size, "sub_groups": g.count,
                        "dtype": g.dtype.name, "decay": g.decay} for g in self.groups],
            "state_dtypes": [d.name for d in self.elem_dtypes],
            "scalars": {n: {"dtype": v.dtype.name, "value": v.tolist()} for n, v in self.scalars.items()}})

    # ---- the step --------------------------------------------------------------------------------
    def train_step(self, compiled, state: TrainState, batch: Any) -> tuple[TrainState, dict]:
        if self.failed:
            raise RuntimeError(f"an earlier NVMe optimizer step failed half-way ({self.failed}); the "
                               f"params are partly updated: load a checkpoint to go on")
        out, metrics = compiled(state, batch)
        if bool(metrics["skipped"]):
            return state._replace(step=out.step, loss_scale=out.loss_scale, model_state=out.model_state), metrics
        try:
            params = self._update(state.params, out.grads)
        except BaseException as e:
            self.failed = f"{type(e).__name__}: {e}"
            raise
        return TrainState(params=params, opt_state=self.device_scalars(), step=out.step,
                          loss_scale=out.loss_scale, model_state=out.model_state), metrics

    def _read(self, slot: int, g: int, k: int, arena: list[np.ndarray]) -> list[np.ndarray]:
        group = self.groups[g]
        views = [buf[:group.sub_size] for buf in arena]
        for j, view in enumerate(views):
            _pread_into(self.fds[slot][g][j], view, k * group.sub_size * view.itemsize, self.block_size)
        return views

    def _write(self, slot: int, g: int, k: int, views: list[np.ndarray]) -> None:
        for j, view in enumerate(views):
            _pwrite_from(self.fds[slot][g][j], view, k * self.groups[g].sub_size * view.itemsize,
                         self.block_size)

    def _update(self, params: Any, grads: Any) -> Any:
        read_slot, write_slot = self.slot, 1 - self.slot
        host_memory.release_freed()        # the gradient step's temporaries
        arenas = self._arenas()
        trained = {k: params[k] for k in self.trained} if self.trained else params
        old_leaves = self.treedef.flatten_up_to(trained)
        grad_leaves = self.treedef.flatten_up_to(grads)
        del trained
        new_leaves: list[Any] = [None] * len(old_leaves)
        host_old: dict[int, np.ndarray] = {}
        host_grad: dict[int, np.ndarray] = {}
        host_new: dict[int, np.ndarray] = {}
        scalars_in = tuple(self._device(self.scalars[n]) for n in self.scalar_names)
        new_scalars = None
        order = [(g, k) for g, group in enumerate(self.groups) for k in range(group.count)]
        reads: dict[int, tuple[list, concurrent.futures.Future | list]] = {}
        writes: list[concurrent.futures.Future] = []
        issued = 0

        def issue(i: int, arena) -> None:
            g, k = order[i]
            if self.pipeline_read:
                reads[i] = (arena, self.pool.submit(self._read, read_slot, g, k, arena))
            else:
                reads[i] = (arena, self._read(read_slot, g, k, arena))

        failed_writes: list[BaseException] = []

        def write_done(arena):
            def done(future):
                if future.exception() is not None:
                    failed_writes.append(future.exception())
                arenas.put(arena)
            return done

        try:
            for i, (g, k) in enumerate(order):
                if failed_writes:
                    raise failed_writes[0]
                group = self.groups[g]
                self._compile(group)
                if issued == i:                      # this sub-group's read: wait for a buffer
                    issue(i, arenas.get())
                    issued += 1
                while self.pipeline_read and issued < len(order):   # read ahead while buffers last
                    try:
                        arena = arenas.get_nowait()
                    except queue.Empty:
                        break
                    issue(issued, arena)
                    issued += 1
                arena, views = reads.pop(i)
                if isinstance(views, concurrent.futures.Future):
                    views = views.result()
                if group.chunks is None:          # staging for params and grads, kept
                    group.chunks = (np.empty(group.sub_size, group.dtype), np.empty(group.sub_size, group.dtype))
                p_chunk, g_chunk = group.chunks
                valid = min(group.sub_size, group.size - k * group.sub_size)
                p_chunk[valid:] = 0                # the last sub-group's padding
                g_chunk[valid:] = 0
                spans = list(self._spans(group, k))
                for leaf, a, b, at in spans:
                    if leaf not in host_old:
                        host_old[leaf] = _to_host(old_leaves[leaf])
                        host_grad[leaf] = _to_host(grad_leaves[leaf])
                        host_new[leaf] = np.empty(host_old[leaf].size, group.dtype)
                    p_chunk[at:at + b - a] = host_old[leaf][a:b]
                    g_chunk[at:at + b - a] = host_grad[leaf][a:b]
                new_p, elems, scalars = group.update(self._device(p_chunk), self._device(g_chunk),
                                                     tuple(self._device(v) for v in views), scalars_in)
                jax.block_until_ready((new_p, elems))
                new_scalars = new_scalars or scalars
                for view, elem in zip(views, elems):
                    np.copyto(view, np.asarray(elem))
                del elems
                if self.pipeline_write:
                    future = self.pool.submit(self._write, write_slot, g, k, views)
                    future.add_done_callback(write_done(arena))
                    writes.append(future)
                else:
                    self._write(write_slot, g, k, views)
                    arenas.put(arena)
                new_p = np.asarray(new_p)
                for leaf, a, b, at in spans:
                    host_new[leaf][a:b] = new_p[at:at + b - a]
                    if b == host_old[leaf].size:      # the leaf is complete: back to the devices
                        new_leaves[leaf] = jax.device_put(host_new.pop(leaf).reshape(self.shapes[leaf]),
                                                          self.param_shardings[leaf])
                        del host_old[leaf], host_grad[leaf]
                        old_leaves[leaf].delete()
                        grad_leaves[leaf].delete()
                        host_memory.release_freed()     # see the module docstring (memory)
                del new_p
            for leaf, new in enumerate(new_leaves):    # empty leaves: nothing to update
                if new is None:
                    new_leaves[leaf] = old_leaves[leaf]
            for future in writes:
                future.result()
        except BaseException:
            # Let the I/O in flight finish before the error leaves; the buffers are made anew.
            for future in [f for _, f in reads.values() if isinstance(f, concurrent.futures.Future)] + writes:
                future.exception()
            self._buffers = None
            raise
        self.scalars = {n: np.asarray(x) for n, x in zip(self.scalar_names, new_scalars)}
        self.slot, self.steps = write_slot, self.steps + 1
        self._write_manifest()
        new_trained = self.treedef.unflatten(new_leaves)
        return {**params, **new_trained} if self.trained else new_trained

    # ---- the canonical tree (checkpoints) ---------------------------------------------------------
    def canonical_opt_state(self) -> Any:
        """The optimizer state as the plain run's optax tree, on the devices in the ZeRO layout."""
        parts = []
        names, j = iter(self.scalar_names), 0
        for elem, shardings in zip(self.elementwise, self.canonical_parts_shardings):
            if not elem:
                parts.append(jax.device_put(self.scalars[next(names)], shardings))
                continue
            leaves = [None] * len(self.shapes)
            sharding_leaves = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
            for g, group in enumerate(self.groups):
                for leaf, offset in zip(group.leaves, group.offsets):
                    host = np.empty(math.prod(self.shapes[leaf]), self.elem_dtypes[j])
                    _pread_into(self.fds[self.slot][g][j], host, offset * host.itemsize, self.block_size)
                    leaves[leaf] = jax.device_put(host.reshape(self.shapes[leaf]), sharding_leaves[leaf])
            for leaf, shape in enumerate(self.shapes):      # empty leaves belong to no group
                if leaves[leaf] is None:
                    leaves[leaf] = jax.device_put(np.zeros(shape, self.elem_dtypes[j]), sharding_leaves[leaf])
            parts.append(self.treedef.unflatten(leaves))
            j += 1
        return self.state_treedef.unflatten(parts)

    def load(self, canonical: Any, steps: int | None = None) -> dict[str, jax.Array]:
        """Write a canonical optimizer state (e.g. restored from a checkpoint) to the free slot
        and make it current; returns the scalars for `engine.state.opt_state`."""
        write_slot = 1 - self.slot
        scalars = {}
        names, j = iter(self.scalar_names), 0
        for part, elem in zip(self.state_treedef.flatten_up_to(canonical), self.elementwise):
            if not elem:
                scalars[next(names)] = np.asarray(part)
                continue
            leaves = self.treedef.flatten_up_to(part)
            for g, group in enumerate(self.groups):
                for leaf, offset in zip(group.leaves, group.offsets):
                    host = _to_host(leaves[leaf]).astype(self.elem_dtypes[j], copy=False)
                    _pwrite_from(self.fds[write_slot][g][j], host, offset * host.itemsize, self.block_size)
            j += 1
        self.scalars, self.slot, self.failed = scalars, write_slot, None
        if steps is not None:
            self.steps = steps
        self._write_manifest()
        return self.device_scalars()

    def file_bytes(self) -> int:
        """Bytes of the state files on disk (both slots, padding included)."""
        return 2 * sum(g.count * g.sub_size for g in self.groups) * sum(d.itemsize for d in self.elem_dtypes)
