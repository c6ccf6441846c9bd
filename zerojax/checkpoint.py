"""Checkpoints: orbax-sharded state under a tag, an atomic `latest` pointer, any-layout restore.

On disk, `ROOT/TAG/` holds
  state/              one orbax checkpoint: {"params": canonical params, "train": optimizer
                      state, step, loss scale, module state} — each process writes its shards
  zerojax_meta.json   what was saved (param shapes, step counters, client_state, model section)
A save is written to `ROOT/.tmp-TAG/`, verified, renamed to `ROOT/TAG/`, and only then
does `ROOT/latest` change (write-to-temp + os.replace), so a crash at any moment leaves
the previous checkpoint loadable. Nothing is ever unpickled: metadata is JSON.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import threading
from typing import Any, Callable

import jax
import numpy as np

from zerojax.errors import CheckpointError

LATEST = "latest"
META = "zerojax_meta.json"
STATE = "state"
FORMAT_VERSION = 1
_TAG_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")


def _orbax():
    """orbax.checkpoint, imported on first use: with tensorstore it adds ~25 MB of RSS and
    half a second to `import zerojax`, which runs that never save or load should not pay."""
    import orbax.checkpoint

    return orbax.checkpoint


# ---- trees as nested dicts with string keys (what orbax and JSON both store) ----------------

def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_name(path) -> str:
    return ".".join(_key_name(k) for k in path)


def to_nested(tree: Any, leaf_fn: Callable = lambda x: x) -> dict:
    """Any pytree as nested dicts keyed by path names (e.g. optax NamedTuples -> dicts)."""
    out: dict = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        node = out
        names = [_key_name(k) for k in path] or ["value"]
        for name in names[:-1]:
            node = node.setdefault(name, {})
        node[names[-1]] = leaf_fn(leaf)
    return out


def from_nested(like: Any, nested: dict) -> Any:
    """Rebuild a pytree shaped like `like` from `to_nested` output."""
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(like)
    leaves = []
    for path, _ in leaves_with_path:
        node = nested
        for name in [_key_name(k) for k in path] or ["value"]:
            node = node[name]
        leaves.append(node)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def shapes_of(tree: Any) -> dict[str, list]:
    """{path name: [shape..., dtype]} for every leaf; what a checkpoint must match."""
    return {path_name(p): [list(np.shape(x)), str(np.dtype(x.dtype))]
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


# ---- PRNG keys are stored as their raw uint32 data ------------------------------------------

def _is_key(x) -> bool:
    return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _keys_to_data(tree):
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _abstract_keys_to_data(tree):
    def one(x):
        if not _is_key(x):
            return x
        data = jax.eval_shape(jax.random.key_data, x)
        return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=getattr(x, "sharding", None))
    return jax.tree.map(one, tree)


def _data_to_keys(like, tree):
    return jax.tree.map(lambda l, x: jax.random.wrap_key_data(x, impl=jax.random.key_impl(l))
                        if _is_key(l) else x, like, tree)


# ---- directory bookkeeping --------------------------------------------------------------------

def check_tag(tag: str) -> str:
    if not isinstance(tag, str) or not _TAG_RE.match(tag) or tag in (".", "..", LATEST):
        raise CheckpointError(f"invalid checkpoint tag {tag!r}: use letters, digits, '_', '-', '.'")
    return tag


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def latest_tag(root: str) -> str | None:
    try:
        with open(os.path.join(root, LATEST)) as f:
            tag = f.read().strip()
    except FileNotFoundError:
        return None
    return tag or None


def read_meta(root: str, tag: str) -> dict:
    path = os.path.join(root, tag, META)
    try:
        with open(path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {os.path.join(root, tag)} is incomplete: {META} is missing "
                              f"(the save did not finish); load another tag") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt: {e}") from None
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format {meta.get('format')!r}; "
                              f"this zerojax reads format {FORMAT_VERSION}")
    return meta


def complete_tags(root: str) -> list[tuple[int, str]]:
    """(global step, tag) of every finished checkpoint under root, oldest first."""
    found = []
    if not os.path.isdir(root):
        return found
    for name in os.listdir(root):
        if name.startswith(".") or not os.path.isfile(os.path.join(root, name, META)):
            continue
        try:
            found.append((int(read_meta(root, name)["global_steps"]), name))
        except CheckpointError:
            continue
    return sorted(found)


def resolve_tag(root: str, tag: str | None) -> str:
    """The tag to load: the given one, or what `latest` names; clear errors otherwise."""
    if not os.path.isdir(root):
        raise CheckpointError(f"checkpoint directory {root!r} does not exist")
    available = [t for _, t in complete_tags(root)]
    if tag is None:
        tag = latest_tag(root)
        if tag is None:
            raise CheckpointError(
                f"no '{LATEST}' file in {root!r}, so there is no checkpoint to resume; "
                + (f"pass tag= one of {available}" if available else "the directory holds no checkpoints"))
    if not os.path.isdir(os.path.join(root, tag)):
        raise CheckpointError(f"checkpoint tag {tag!r} not found in {root!r}; available: {available or 'none'}")
    return tag


# ---- save ---------------------------------------------------------------------------------------

class Saver:
    """Writes checkpoints; with async saves the finalize step runs in a background thread."""

    def __init__(self):
        self._orbax = _orbax().StandardCheckpointer()
        self._pending: threading.Thread | None = None
        self._error: BaseException | None = None

    def wait(self) -> None:
        """Block until the last save is complete and `latest` names it."""
        if self._pending is not None:
            self._pending.join()
            self._pending = None
        if self._error is not None:
            error, self._error = self._error, None
            raise CheckpointError(f"the last asynchronous checkpoint save failed: {error}") from error

    def save(self, root: str, tag: str, state: dict, meta: dict, *, async_save: bool = False,
             max_to_keep: int | None = None, keep_every: int | None = None) -> str:
        check_tag(tag)
        self.wait()
        root = os.path.abspath(root)          # orbax (tensorstore) wants absolute paths
        primary = jax.process_index() == 0
        final, tmp = os.path.join(root, tag), os.path.join(root, f".tmp-{tag}")
        if primary:
            os.makedirs(root, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)      # debris of a crashed save
            os.makedirs(tmp)
        _sync("zerojax_ckpt_mkdir")
        self._orbax.save(os.path.join(tmp, STATE), _keys_to_data(state))

        def finalize():
            self._orbax.wait_until_finished()
            _sync("zerojax_ckpt_written")
            if primary:
                if not os.path.isdir(os.path.join(tmp, STATE)):
                    raise CheckpointError(f"orbax did not commit {tmp}/{STATE}")
                _write_atomic(os.path.join(tmp, META), json.dumps(meta, indent=1))
                if os.path.exists(final):
                    old = os.path.join(root, f".old-{tag}")
                    shutil.rmtree(old, ignore_errors=True)
                    os.replace(final, old)
                    os.replace(tmp, final)
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    os.replace(tmp, final)
                _write_atomic(os.path.join(root, LATEST), tag)
                _prune(root, keep=tag, max_to_keep=max_to_keep, keep_every=keep_every)
            _sync("zerojax_ckpt_done")

        if async_save:
            def run():
                try:
                    finalize()
                except BaseException as e:  # surfaced by the next wait()
                    self._error = e
            self._pending = threading.Thread(target=run, name="zerojax-checkpoint", daemon=False)
            self._pending.start()
        else:
            finalize()
        return final


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def _prune(root: str, *, keep: str, max_to_keep: int | None, keep_every: int | None) -> None:
    """Keep the newest `max_to_keep` checkpoints; those at a multiple of `keep_every` stay
    besides them (orbax's keep_period semantics)."""
    if not max_to_keep:
        return
    pool = [t for s, t in complete_tags(root) if not (keep_every and s % keep_every == 0)]
    for tag in pool[:max(len(pool) - max_to_keep, 0)]:
        if tag != keep:
            shutil.rmtree(os.path.join(root, tag), ignore_errors=True)


# ---- restore ------------------------------------------------------------------------------------

def check_params_match(meta: dict, abstract_params: Any, where: str, *, partial: bool = False) -> None:
    """The checkpoint holds exactly these params (`partial`: at least these), same shapes."""
    saved, wanted = meta["params"], shapes_of(abstract_params)
    missing = sorted(set(wanted) - set(saved))
    unexpected = [] if partial else sorted(set(saved) - set(wanted))
    differ = [f"{k}: checkpoint {saved[k][0]} {saved[k][1]}, model {wanted[k][0]} {wanted[k][1]}"
              for k in sorted(set(saved) & set(wanted)) if saved[k][0] != wanted[k][0]]
    if missing or unexpected or differ:
        lines = ([f"missing in checkpoint: {', '.join(missing[:5])}"] if missing else []) \
            + ([f"not in model: {', '.join(unexpected[:5])}"] if unexpected else []) + differ[:5]
        raise CheckpointError(f"checkpoint {where} does not fit this model: " + "; ".join(lines))


def model_section(meta: dict) -> tuple[dict | None, str | None]:
    """The checkpoint's model section (to rebuild the module) and where its params sit: a
    wrapper trained around a model (DPO's policy + reference) saves the model's params under
    one subtree, `params_under` (None: the params are the model's)."""
    section = dict(meta.get("model") or {}) or None
    prefix = section.pop("params_under", None) if section else None
    return section, prefix


def restore_model_params(root: str, tag: str, meta: dict, target: dict) -> dict:
    """The model's params (`target`: nested abstract arrays with the wanted shardings), also
    from a wrapper's checkpoint (`model_section`'s `params_under`)."""
    _, prefix = model_section(meta)
    wanted = {prefix: target} if prefix else target
    check_params_match(meta, wanted, os.path.join(root, tag), partial=prefix is not None)
    restored = restore(root, tag, {"params": wanted})["params"]
    return restored[prefix] if prefix else restored


def restore(root: str, tag: str, target: dict) -> dict:
    """Restore the subtree `target` (abstract arrays with the wanted shardings) from a tag."""
    path = os.path.join(os.path.abspath(root), tag, STATE)
    abstract = _abstract_keys_to_data(target)
    restore_args = _orbax().checkpoint_utils.construct_restore_args(abstract)
    try:
        restored = _orbax().PyTreeCheckpointer().restore(
            path, args=_orbax().args.PyTreeRestore(item=abstract, restore_args=restore_args, partial_restore=True))
    except Exception as e:  # orbax/tensorstore raise many types for unreadable data
        raise CheckpointError(f"could not read checkpoint {path}: {type(e).__name__}: {str(e)[:400]} "
                              f"(the files are truncated, corrupt or from another model)") from None
    return _data_to_keys(target, restored)


def read_param(root: str, tag: str, name: str, shape, dtype) -> np.ndarray:
    """One param as a host array, read alone (streamed export keeps one tensor in memory)."""
    nested: dict = {}
    node = nested
    keys = ["params", *name.split(".")]
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = np.zeros((), dtype)   # placeholder leaf; the restore type is numpy
    args: dict = {}
    anode = args
    for key in keys[:-1]:
        anode = anode.setdefault(key, {})
    anode[keys[-1]] = _orbax().RestoreArgs(restore_type=np.ndarray)
    path = os.path.join(os.path.abspath(root), tag, STATE)
    try:
        out = _orbax().PyTreeCheckpointer().restore(
            path, args=_orbax().args.PyTreeRestore(item=nested, restore_args=args, partial_restore=True))
    except Exception as e:
        raise CheckpointError(f"could not read {name} from checkpoint {path}: {type(e).__name__}: "
                              f"{str(e)[:300]}") from None
    for key in keys:
        out = out[key]
    if list(out.shape) != list(shape):
        raise CheckpointError(f"{name} in {path} has shape {list(out.shape)}, metadata says {list(shape)}")
    return out


def export_safetensors(root: str, out_path: str, *, tag: str | None = None, dtype: str = "float32") -> str:
    """Consolidated weights of a checkpoint as one safetensors file, one tensor in memory at a time.

    The `zero_to_fp32` equivalent: works from any checkpoint, no mesh, no model code.
    """
    from zerojax.safetensors_io import write_safetensors

    tag = resolve_tag(root, tag)
    meta = read_meta(root, tag)
    if dtype not in ("float32", "bfloat16"):
        raise CheckpointError(f"export dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    import ml_dtypes
    target = np.float32 if dtype == "float32" else ml_dtypes.bfloat16
    entries = [(name, tuple(shape), np.dtype(target) if np.dtype(d).kind == "f" else np.dtype(d))
               for name, (shape, d) in sorted(meta["params"].items())]
    kinds = dict((n, d) for n, _, d in entries)
    shapes = dict((n, s) for n, s, _ in entries)

    def fetch(name):
        saved_dtype = meta["params"][name][1]
        # copy=False: an fp32 export of fp32 params holds one copy of the tensor, not two.
        return read_param(root, tag, name, shapes[name], saved_dtype).astype(kinds[name], copy=False)

    write_safetensors(out_path, entries, fetch, metadata={"format": "pt", "zerojax_tag": tag})
    return out_path
