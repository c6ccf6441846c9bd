"""Monitor: metrics.jsonl, progress output, loss-curve PNG, TensorBoard and CSV files."""
import csv
import glob
import io
import json
import os
import struct

from zerojax.monitor import Monitor, read_loss_curve

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


def metrics(step):
    return {"loss": 3.0 - 0.01 * step, "lr": 1e-3, "tokens_per_s": 17086.4,
            "grad_norm": 0.73, "skipped": False}


def run(out_dir, first, last, total, **kw):
    stream = kw.pop("stream", None) or io.StringIO()
    mon = Monitor(str(out_dir), total_steps=total, start_step=first - 1, stream=stream, **kw)
    for step in range(first, last + 1):
        mon.log(step, metrics(step))
    return mon, stream


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_jsonl_and_append_on_resume(tmp_path):
    mon, _ = run(tmp_path, 1, 5, 10)
    mon.log_eval(5, 2.5)
    mon.close()
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 5]
    assert rows[0] == {"step": 1, "loss": 2.99, "lr": 1e-3, "tokens_per_s": 17086.4,
                       "grad_norm": 0.73, "skipped": False}
    assert rows[-1] == {"step": 5, "eval_loss": 2.5}

    mon, _ = run(tmp_path, 6, 10, 10)  # resumed run appends to the same file
    mon.close({"steps": 10})
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 11))


def test_plain_lines_honour_steps_per_print(tmp_path):
    mon, stream = run(tmp_path, 1, 60, 60, steps_per_print=20)
    mon.message("hello")
    mon.close({"steps": 60})
    lines = stream.getvalue().splitlines()
    steps = [line.split()[1] for line in lines if line.startswith("step ")]
    assert steps == ["1/60", "20/60", "40/60", "60/60"]
    line20 = next(line for line in lines if line.startswith("step 20/60"))
    assert "loss 2.8000" in line20 and "lr 1.00e-03" in line20 and "grad_norm 0.73" in line20
    assert "17,086 tok/s" in line20 and "eta 0:00:0" in line20
    assert "hello" in lines and "summary:" in lines
    assert any("final_loss" in line for line in lines)

    # default: every 10 steps, plus first and last; a resumed run starts its lines at its first step
    mon, stream = run(tmp_path / "b", 16, 35, 35)
    mon.close()
    steps = [line.split()[1] for line in stream.getvalue().splitlines() if line.startswith("step ")]
    assert steps == ["16/35", "20/35", "30/35", "35/35"]


def test_tty_mode_runs(tmp_path):
    stream = FakeTTY()
    mon, _ = run(tmp_path, 1, 30, 30, stream=stream)
    mon.message("a message")
    mon.log_eval(30, 2.7)
    mon.close({"steps": 30})
    out = stream.getvalue()
    assert "a message" in out and "30/30" in out and "final_loss" in out
    assert len(read_jsonl(tmp_path / "metrics.jsonl")) == 31
    # steps_per_print explicitly set: plain lines also appear above the bar
    stream = FakeTTY()
    mon, _ = run(tmp_path / "b", 1, 10, 10, stream=stream, steps_per_print=5)
    mon.close()
    assert "step 5/10  loss" in stream.getvalue()


def test_loss_curve_png_covers_resumed_run(tmp_path):
    mon, _ = run(tmp_path, 1, 8, 20)
    mon.log_eval(8, 2.95)
    mon.close()
    mon, _ = run(tmp_path, 7, 20, 20)  # resumed from step 6: steps 7, 8 replayed
    mon.log_eval(20, 2.85)
    mon.close()
    png = tmp_path / "loss_curve.png"
    data = png.read_bytes()
    assert data[:8] == PNG_MAGIC
    width, height = struct.unpack(">II", data[16:24])
    assert width > 100 and height > 100
    steps, losses, eval_steps, eval_losses = read_loss_curve(str(tmp_path / "metrics.jsonl"))
    assert steps == list(range(1, 21)) and len(losses) == 20
    assert eval_steps == [8, 20] and eval_losses == [2.95, 2.85]


def read_events(path):
    """Scalar (tag, step, value) triples from a TFRecord event file."""
    from tensorboardX.proto import event_pb2
    out = []
    with open(path, "rb") as f:
        while header := f.read(12):
            (length,) = struct.unpack("<Q", header[:8])
            event = event_pb2.Event.FromString(f.read(length))
            f.read(4)  # data crc
            for v in event.summary.value:
                out.append((v.tag, event.step, v.simple_value))
    return out


def test_tensorboard_events(tmp_path):
    tb = {"enabled": True, "output_path": str(tmp_path / "tb"), "job_name": "job"}
    mon, _ = run(tmp_path, 1, 3, 3, tensorboard=tb)
    mon.log_eval(3, 2.5)
    mon.close()
    files = glob.glob(str(tmp_path / "tb" / "job" / "events.out.tfevents.*"))
    assert len(files) == 1
    scalars = read_events(files[0])
    assert ("Train/loss", 2, 2.98) in [(t, s, round(v, 6)) for t, s, v in scalars]
    tags = {t for t, _, _ in scalars}
    assert {"Train/loss", "Train/lr", "Train/tokens_per_s", "Eval/eval_loss"} <= tags

    mon, _ = run(tmp_path / "d", 1, 2, 2, tensorboard={"enabled": True})  # defaults
    mon.close()
    assert glob.glob(str(tmp_path / "d" / "tensorboard" / "zerojax" / "events.out.tfevents.*"))


def test_csv_monitor(tmp_path):
    cfg = {"enabled": True, "output_path": str(tmp_path / "csv"), "job_name": "job"}
    mon, _ = run(tmp_path, 1, 3, 6, csv_monitor=cfg)
    mon.close()
    mon, _ = run(tmp_path, 4, 6, 6, csv_monitor=cfg)  # resume: appended, no second header
    mon.log_eval(6, 2.5)
    mon.close()
    with open(tmp_path / "csv" / "job" / "loss.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["step", "loss"]
    assert [int(r[0]) for r in rows[1:]] == [1, 2, 3, 4, 5, 6]
    assert float(rows[2][1]) == 2.98
    assert os.path.exists(tmp_path / "csv" / "job" / "lr.csv")
    with open(tmp_path / "csv" / "job" / "eval_loss.csv") as f:
        assert list(csv.reader(f)) == [["step", "eval_loss"], ["6", "2.5"]]


def test_non_primary_writes_nothing(tmp_path):
    stream = io.StringIO()
    out = tmp_path / "out"
    mon, _ = run(out, 1, 10, 10, primary=False, stream=stream,
                 tensorboard={"enabled": True}, csv_monitor={"enabled": True})
    mon.log_eval(10, 2.0)
    mon.message("hi")
    mon.close({"steps": 10})
    assert stream.getvalue() == ""
    assert not out.exists()
