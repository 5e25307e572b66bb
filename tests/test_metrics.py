"""Metric writers: TensorBoard event files, metrics.jsonl, console progress; process 0 only."""

import glob
import io
import json
import struct

import jax
import pytest

from saejax import metrics


def _read_events(path):
    """Scalars from a TensorBoard event file (TFRecord framing + Event protos)."""
    from tensorboardX.proto import event_pb2

    out = {}
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos < len(data):
        (n,) = struct.unpack("<Q", data[pos:pos + 8])
        event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
        pos += 12 + n + 4
        for v in event.summary.value:
            out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_metric_writer_writes_tensorboard_and_jsonl(tmp_path):
    w = metrics.MetricWriter(tmp_path)
    w.write_scalars(10, {"train/loss": 3.5, "train/lr": 1e-3})
    w.write_scalars(20, {"train/loss": 3.0, "val/loss": float("nan")})
    w.close()
    (events,) = glob.glob(str(tmp_path / "events.out.tfevents.*"))
    scalars = _read_events(events)
    assert scalars["train/loss"] == [(10, 3.5), (20, 3.0)]
    assert scalars["train/lr"][0][0] == 10
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [10, 20]
    assert lines[0]["train/loss"] == 3.5 and lines[1]["val/loss"] == "nan"


def test_only_process_zero_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    w = metrics.MetricWriter(tmp_path / "p1")
    w.write_scalars(1, {"x": 1.0})
    w.close()
    assert not (tmp_path / "p1").exists()
    stream = io.StringIO()
    bar = metrics.ProgressBar(10, stream=stream)
    bar.update(5, {"loss": 1.0}, force=True)
    assert stream.getvalue() == ""


def test_progress_bar_shows_step_values_and_eta(monkeypatch):
    clock = iter([100.0, 110.0, 111.0, 200.0])
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    stream = io.StringIO()
    bar = metrics.ProgressBar(100, start_step=0, stream=stream, min_interval_s=5.0)
    bar.update(10, {"loss": 3.14159, "tok/s": 250000.0})  # t=110: 10 steps in 10 s
    bar.update(11, {"loss": 3.0})  # t=111: throttled (non-tty)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    line = lines[0]
    assert "10/100" in line and "loss 3.142" in line and "tok/s 2.5e+05" in line
    assert "ETA 01:30" in line  # 90 steps left at 1 step/s
    assert line.startswith("[##")


@pytest.mark.parametrize("seconds,text", [(59, "00:59"), (3725, "1:02:05")])
def test_time_format(seconds, text):
    assert metrics._fmt_time(seconds) == text
