"""`zerojax.train`: the whole loop — data, steps, eval, checkpoints, resume, graceful stop.

    summary = zerojax.train(model_fn, "configs/tiny.json", steps=200, out="runs/tiny")

The output directory holds checkpoints (`latest` + tags), `metrics.jsonl` and a loss curve;
rerunning with the same directory resumes from its latest checkpoint, data position
included, so an interrupted run continues exactly where it stopped.
"""
from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from typing import Any, Callable, Iterable, Mapping

import jax
import numpy as np
from flax import nnx

from zerojax import checkpoint, models
from zerojax.config import Config, ConfigError
from zerojax.data import TokenBatches, load_corpus
from zerojax.engine import Engine, initialize, use_compilation_cache
from zerojax.monitor import Monitor

DEFAULT_OUT = "runs/zerojax"
EVAL_SEED = 1234            # validation windows are the same at every eval and every resume


def model_fn_from_config(config: Config) -> tuple[Callable[[nnx.Rngs], nnx.Module], dict]:
    """`rngs -> Module` from the config's `zerojax.model` section (HF field names).

    With `init_from` naming a Hugging Face directory, the architecture comes from its
    config.json (fields given in the section must agree).
    """
    section = dict(config.zerojax.model)
    if not section:
        raise ConfigError('no model: add "zerojax": {"model": {"type": "llama", ...}} to the config, '
                          "or pass model_fn= to zerojax.train")
    init_from = section.pop("init_from", None)
    if init_from and os.path.isfile(os.path.join(init_from, "config.json")):
        from zerojax import hf
        from_hf = hf.model_section(init_from)
        clash = {k: (v, from_hf.get(k)) for k, v in section.items() if from_hf.get(k, v) != v}
        if clash:
            raise ConfigError(f"zerojax.model disagrees with {init_from}/config.json: "
                              + ", ".join(f"{k} {a} vs {b}" for k, (a, b) in clash.items()))
        section = from_hf
    try:
        models.make_config(section)        # validate now: a bad field is a config error
    except ValueError as e:
        raise ConfigError(f"zerojax.model: {e}") from None
    return (lambda rngs: models.build(section, rngs)), {**section, "init_from": init_from}


def _init_weights(engine: Engine, init_from: str | None) -> None:
    """Fine-tuning start point: a Hugging Face directory or a zerojax checkpoint directory."""
    if init_from:
        engine.set_params(load_model_params(engine, init_from))


def load_model_params(engine: Engine, source: str, subtree: str | None = None) -> Any:
    """The weights of `source` (a HF directory or a zerojax checkpoint root, a wrapper's
    included: DPO's saves its policy) laid out like `engine`'s params, or like its
    `subtree` of them when the engine's model wraps this one (a reward model's `base`)."""
    shardings, like = engine.state_shardings.params, engine.state.params
    if subtree is not None:
        shardings, like = shardings[subtree], like[subtree]
    if os.path.isfile(os.path.join(source, "config.json")):
        from zerojax import hf
        return hf.load_params(source, shardings=shardings)
    tag = checkpoint.resolve_tag(source, None)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), like, shardings)
    restored = checkpoint.restore_model_params(source, tag, checkpoint.read_meta(source, tag),
                                               checkpoint.to_nested(abstract))
    return checkpoint.from_nested(like, restored)


class StopRequest:
    """SIGINT/SIGTERM ask the loop to stop after the current step (and save)."""

    def __init__(self):
        self.requested = False

    @contextlib.contextmanager
    def installed(self):
        def handler(signum, frame):
            self.requested = True
        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):       # not the main thread: leave handlers alone
                previous[sig] = signal.signal(sig, handler)
        try:
            yield self
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)


# Dense bf16 peak FLOP/s per chip, for MFU (as MaxText and Levanter quote it).
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "TPU v4": 275e12,
              "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12}


def step_flops(engine: Engine, batch: Mapping[str, Any]) -> float | None:
    """Model FLOPs of one train step from XLA's cost analysis of the lowered program."""
    try:
        cost = engine.lower_train_step(batch).cost_analysis()
    except Exception:       # some backends cannot analyse; MFU is then not reported
        return None
    flops = (cost or {}).get("flops")
    return float(flops) if flops else None


def peak_flops(devices) -> float | None:
    kind = devices[0].device_kind
    peak = next((v for k, v in PEAK_FLOPS.items() if k.lower() in kind.lower()), None)
    return peak * len(devices) if peak else None


def _evaluate(engine: Engine, batches: list[dict]) -> float:
    return float(np.mean([float(engine.eval_step(b)) for b in batches]))


def train(model_fn: Callable[[nnx.Rngs], nnx.Module] | None, config: Any, data: Iterable | None = None,
          *, steps: int | None = None, out: str | None = None, eval_data: Iterable | None = None,
          resume: bool = True, stream=None, init_weights: Callable[[Engine], None] | None = None) -> dict:
    """Train `model_fn`'s model (or the config's `zerojax.model`) and return a summary dict.

    `data`: an iterable of batches (dicts of `train_batch_size / process_count` rows);
    by default the config's `zerojax.data` corpus. An iterable with `state()` /
    `restore()` (like `TokenBatches`) is resumed exactly from checkpoints.
    `init_weights(engine)`: a fresh run's start point instead of the model's `init_from`
    (a model that wraps others, e.g. DPO's policy and reference, loads its own).
    """
    config = Config.load(config)
    train_cfg = config.zerojax.train
    steps = steps or train_cfg["steps"]
    if not steps:
        raise ConfigError('how many steps? pass steps= (--steps) or set "zerojax": {"train": {"steps": N}}')
    out = out or train_cfg["out"] or DEFAULT_OUT
    if config.zerojax.compilation_cache:      # before anything compiles (the engine sets it too)
        use_compilation_cache(config.zerojax.compilation_cache)

    init_from, vocab, section = None, None, {}
    if model_fn is None:
        model_fn, section = model_fn_from_config(config)
        init_from, vocab = section["init_from"], section.get("vocab_size")
    seq_len = int(config.zerojax.data.get("seq_len", 256))
    corpus, pairs = None, None
    if data is None and section.get("type") == "t5":     # encoder-decoder: source/target pairs
        pairs = _seq2seq_examples(config.zerojax.data, init_from, seq_len)
    elif data is None:  # read and check the data before building anything expensive
        corpus = load_corpus(config.zerojax.data, vocab_size=vocab or 2**32)

    engine = initialize(model_fn=model_fn, config=config)
    rows = engine.batch_sizes.train_batch_size
    if pairs is not None:
        from zerojax.seq2seq import Seq2SeqBatches
        data = Seq2SeqBatches(pairs, rows, max_source_len=seq_len, max_target_len=seq_len,
                              pad_id=int(section.get("pad_token_id") or 0), seed=config.zerojax.seed)
    if corpus is not None:
        train_tokens, val_tokens = corpus
        data = TokenBatches(train_tokens, seq_len, rows, seed=config.zerojax.seed)
        if eval_data is None and len(val_tokens) > seq_len:
            evaluator = TokenBatches(val_tokens, seq_len, rows, seed=EVAL_SEED)
            eval_data = [evaluator.batch(i) for i in range(train_cfg["eval_batches"])]
    data_iter = data if hasattr(data, "next") else iter(data)
    eval_batches = list(eval_data) if eval_data is not None else []

    start = 0
    if resume and checkpoint.latest_tag(out) is not None:
        _, client_state = engine.load_checkpoint(out)
        start = engine.global_steps
        if "data" in client_state and hasattr(data_iter, "restore"):
            data_iter.restore(client_state["data"])
    elif init_weights is not None:
        init_weights(engine)
    else:
        _init_weights(engine, init_from)

    primary = jax.process_index() == 0
    monitor = make_monitor(config, out, steps=steps, start=start, primary=primary, stream=stream)
    if start:
        monitor.message(f"resumed from {out} at step {start}")
    if start >= steps:
        monitor.close({"steps": start, "note": "already trained this far"})
        return {"steps": start, "out": out}

    def save(step):
        state = {"data": data_iter.state()} if hasattr(data_iter, "state") else {}
        engine.save_checkpoint(out, client_state=state, async_save=train_cfg["async_checkpointing"])

    tokens_per_step = rows * seq_len
    log_every = train_cfg["log_every"] or 1
    flops, peak = None, peak_flops(engine.mesh.devices.flat)
    step, last_saved, last_loss, best_eval, t_run = start, None, math.nan, math.inf, time.perf_counter()
    measured = []
    stop = StopRequest()
    with stop.installed():
        while step < steps:
            batch = next(data_iter) if not hasattr(data_iter, "next") else data_iter.next()
            if step == start and any(k.endswith("ids") for k in batch):   # the real batch, not the corpus default
                tokens_per_step = sum(int(np.size(v)) for k, v in batch.items() if k.endswith("ids")) \
                    * jax.process_count()
            t0 = time.perf_counter()
            metrics = engine.train_step(batch)
            last_loss = float(metrics["loss"])          # syncs: the step time is real
            elapsed = time.perf_counter() - t0
            step += 1
            if step > start + 1:                        # the first step includes compilation
                measured.append(elapsed)
            record = {k: (bool(v) if k == "skipped" else int(v) if k == "step" else float(v))
                      for k, v in metrics.items()}
            record.update(step=step, tokens_per_s=tokens_per_step / elapsed, step_time_s=elapsed)
            if not config.fp16.enabled:
                record.pop("loss_scale", None)          # always 1 without fp16: noise in the log
            if flops is None and step == start + 1:
                flops = step_flops(engine, batch) or 0.0
            if flops:
                record["tflops"] = flops / elapsed / 1e12
                if peak:
                    record["mfu"] = flops / elapsed / peak
            if step % log_every == 0 or step == start + 1 or step == steps or stop.requested:
                monitor.log(step, record)
            if eval_batches and train_cfg["eval_every"] and step % train_cfg["eval_every"] == 0:
                eval_loss = _evaluate(engine, eval_batches)
                best_eval = min(best_eval, eval_loss)
                monitor.log_eval(step, eval_loss)
            if train_cfg["checkpoint_every"] and step % train_cfg["checkpoint_every"] == 0:
                save(step)
                last_saved = step
            if stop.requested:
                monitor.message(f"stop requested: saving a checkpoint at step {step}")
                break
        if last_saved != step:
            save(step)
        engine.wait_for_checkpoint()

    summary = {"steps": step, "final_loss": last_loss, "out": out,
               "tokens_per_s": tokens_per_step / float(np.median(measured)) if measured else math.nan,
               "wall_s": time.perf_counter() - t_run}
    if eval_batches:
        summary["eval_loss"] = _evaluate(engine, eval_batches)
        summary["best_eval_loss"] = min(best_eval, summary["eval_loss"])
    if stop.requested:
        summary["stopped_early"] = True
    monitor.close(summary)
    return summary


def _seq2seq_examples(data_section, init_from: str | None, seq_len: int) -> list:
    """An encoder-decoder model's `zerojax.data.corpus`: `{"source", "target"}` JSONL, tokenised
    by the model directory's tokenizer.json (else bytes), each side cut to `seq_len`."""
    from zerojax.inference import tokenizer as tok
    from zerojax.seq2seq import read_examples
    path = data_section.get("corpus")
    if not isinstance(path, str) or not path.endswith((".jsonl", ".json")):
        raise ConfigError(f'zerojax.data.corpus: an encoder-decoder model (t5) trains on '
                          f'{{"source", "target"}} JSONL; got {path!r} (set it to a .jsonl file)')
    tokenizer = tok.for_directory_or_bytes(init_from if init_from and os.path.isdir(init_from) else None)
    return read_examples(path, tokenizer, max_source_len=seq_len, max_target_len=seq_len)


def make_monitor(config: Config, out: str, *, steps: int, start: int, primary: bool = True, stream=None) -> Monitor:
    """The run's progress bar / lines, metrics.jsonl, loss curve and the config's monitors."""
    return Monitor(out, total_steps=steps, start_step=start, steps_per_print=config.steps_per_print,
                   tensorboard=_enabled(config.tensorboard), csv_monitor=_enabled(config.csv_monitor),
                   primary=primary, stream=stream)


def _enabled(section) -> dict | None:
    if not section.enabled:
        return None
    return {"enabled": True, "output_path": section.output_path, "job_name": section.job_name}
