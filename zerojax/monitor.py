"""Training monitor: progress display, metrics.jsonl, TensorBoard/CSV output, loss curve.

Only the primary process (process 0) writes anything; elsewhere every method is a no-op.
"""
from __future__ import annotations

import csv
import datetime
import json
import os
import sys
import time


def _scalar(value):
    """A JSON-friendly Python scalar: bools and ints kept (NumPy/JAX ones too), else a float."""
    kind = getattr(getattr(value, "dtype", None), "kind", None)
    if isinstance(value, bool) or kind == "b":
        return bool(value)
    if isinstance(value, int) or kind in ("i", "u"):
        return int(value)
    return float(value)


def _duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(round(max(seconds, 0.0)))))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


def read_loss_curve(jsonl_path: str):
    """(train_steps, losses, eval_steps, eval_losses) from a metrics.jsonl, sorted by step.

    A step logged twice (a resumed run replaying steps after its last checkpoint) keeps
    its latest value.
    """
    train, evals = {}, {}
    with open(jsonl_path) as f:
        for rec in (json.loads(line) for line in f if line.strip()):
            if "loss" in rec:
                train[rec["step"]] = rec["loss"]
            if "eval_loss" in rec:
                evals[rec["step"]] = rec["eval_loss"]
    ts, es = sorted(train), sorted(evals)
    return ts, [train[s] for s in ts], es, [evals[s] for s in es]


def plot_loss_curve(jsonl_path: str, png_path: str) -> None:
    """Write a PNG of train loss (and eval loss points) vs step, without touching pyplot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps, losses, eval_steps, eval_losses = read_loss_curve(jsonl_path)
    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(steps, losses, label="train loss", linewidth=1.2)
    if eval_steps:
        ax.plot(eval_steps, eval_losses, "o-", label="eval loss", markersize=4)
    ax.set(xlabel="step", ylabel="loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, format="png")


class _CsvMonitor:
    """DeepSpeed's csv_monitor layout: `output_path/job_name/<metric>.csv`, header `step,<metric>`."""

    def __init__(self, log_dir: str):
        self.log_dir = log_dir
        os.makedirs(log_dir, exist_ok=True)

    def write(self, name: str, value, step: int) -> None:
        path = os.path.join(self.log_dir, name.replace("/", "_").replace(" ", "_") + ".csv")
        new = not os.path.exists(path) or os.path.getsize(path) == 0
        with open(path, "a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["step", name])
            writer.writerow([step, value])


class Monitor:
    """What the train loop reports to: call log() every optimizer step, close() at the end."""

    def __init__(self, out_dir: str, *, total_steps: int, start_step: int = 0,
                 steps_per_print: int | None = None, tensorboard: dict | None = None,
                 csv_monitor: dict | None = None, primary: bool = True, stream=None):
        self.primary, self.out_dir, self.total_steps = primary, out_dir, total_steps
        self.stream = stream if stream is not None else sys.stderr
        self._closed = not primary
        if not primary:
            return
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        # In a terminal the bar shows every step; plain lines only if asked for explicitly.
        self.print_every = steps_per_print or (None if self.tty else 10)
        self.t0 = time.time()
        self._first = None          # (step, time) of the first logged step, for the ETA
        self.last, self.last_step, self.steps_logged = {}, start_step, 0
        self.tok_s_sum, self.best_eval = 0.0, None

        os.makedirs(out_dir, exist_ok=True)
        self.jsonl_path = os.path.join(out_dir, "metrics.jsonl")
        self._jsonl = open(self.jsonl_path, "a")

        self._tb = None
        if tensorboard and tensorboard.get("enabled"):
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(self._log_dir(tensorboard, "tensorboard"))
        self._csv = None
        if csv_monitor and csv_monitor.get("enabled"):
            self._csv = _CsvMonitor(self._log_dir(csv_monitor, "csv"))

        self._progress = None
        if self.tty:  # a live bar; message() prints above it
            from rich.console import Console
            from rich.progress import (BarColumn, Progress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)
            self._progress = Progress(
                TextColumn("step {task.completed:.0f}/{task.total:.0f}"), BarColumn(),
                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"),
                TimeRemainingColumn(), console=Console(file=self.stream), refresh_per_second=4)
            self._task = self._progress.add_task(
                "train", total=total_steps, completed=start_step, info="")
            self._progress.start()

    def _log_dir(self, cfg: dict, default_sub: str) -> str:
        root = cfg.get("output_path") or os.path.join(self.out_dir, default_sub)
        return os.path.join(root, cfg.get("job_name") or "zerojax")

    def _write_jsonl(self, record: dict) -> None:
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()

    def _scalars(self, prefix: str, values: dict, step: int) -> None:
        for name, value in values.items():
            if self._tb is not None:
                self._tb.add_scalar(f"{prefix}/{name}", float(value), step)
            if self._csv is not None:
                self._csv.write(name, value, step)

    def _eta(self, step: int) -> float | None:
        now = time.time()
        if self._first is None:
            self._first = (step, now)
        first_step, first_t = self._first
        if step <= first_step:
            return None
        return (self.total_steps - step) * (now - first_t) / (step - first_step)

    def _line(self, step: int, m: dict, eta: float | None) -> str:
        parts = [f"step {step}/{self.total_steps}", f"loss {m['loss']:.4f}", f"lr {m['lr']:.2e}"]
        if "grad_norm" in m:
            parts.append(f"grad_norm {m['grad_norm']:.2f}")
        if "loss_scale" in m:
            parts.append(f"loss_scale {m['loss_scale']:g}")
        if m.get("skipped"):
            parts.append("skipped")
        parts.append(f"{m['tokens_per_s']:,.0f} tok/s")
        if "mfu" in m:
            parts.append(f"mfu {100 * m['mfu']:.1f}%")
        parts.append(f"eta {_duration(eta) if eta is not None else '?'}")
        return "  ".join(parts)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self._closed:
            return
        m = {k: _scalar(v) for k, v in metrics.items()}
        self._write_jsonl({"step": step, **m})
        self._scalars("Train", m, step)
        self.last, self.last_step, self.steps_logged = m, step, self.steps_logged + 1
        self.tok_s_sum += m.get("tokens_per_s", 0.0)
        eta = self._eta(step)
        if self._progress is not None:
            info = f"loss {m['loss']:.4f}  {m['tokens_per_s']:,.0f} tok/s  lr {m['lr']:.2e}"
            self._progress.update(self._task, completed=step, info=info)
        every = self.print_every
        if every and (step % every == 0 or self.steps_logged == 1 or step == self.total_steps):
            self.message(self._line(step, m, eta))
            if self._tb is not None:
                self._tb.flush()

    def log_eval(self, step: int, eval_loss: float) -> None:
        if self._closed:
            return
        eval_loss = float(eval_loss)
        self._write_jsonl({"step": step, "eval_loss": eval_loss})
        self._scalars("Eval", {"eval_loss": eval_loss}, step)
        if self.best_eval is None or eval_loss < self.best_eval:
            self.best_eval = eval_loss
        self.message(f"step {step}/{self.total_steps}  eval_loss {eval_loss:.4f}")

    def message(self, text: str) -> None:
        if not self.primary:
            return
        if self._progress is not None and not self._closed:
            self._progress.console.print(text, markup=False, highlight=False)
        else:
            print(text, file=self.stream, flush=True)

    def close(self, summary: dict | None = None) -> None:
        if self._closed:
            return
        if self._progress is not None:
            self._progress.stop()
        self._closed = True
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        png = os.path.join(self.out_dir, "loss_curve.png")
        plot_loss_curve(self.jsonl_path, png)
        stats = {"steps": self.last_step}
        if self.last:
            stats["final_loss"] = self.last["loss"]
            stats["mean_tokens_per_s"] = self.tok_s_sum / self.steps_logged
        if self.best_eval is not None:
            stats["best_eval_loss"] = self.best_eval
        stats["wall_time"] = _duration(time.time() - self.t0)
        stats.update(summary or {})
        stats["loss_curve"] = png
        width = max(len(k) for k in stats)
        self.message("summary:")
        for key, value in stats.items():
            self.message(f"  {key:<{width}}  {_fmt(value)}")
