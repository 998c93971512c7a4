"""What a run tells its user: the device it runs on (refused in one line when CUDA is asked for
and cannot be used), a short settings summary instead of the config dump, log lines with the
iteration total, s/iter and ETAs, the end-of-run summary, loss meters read once per log period,
and console lines that stay whole when several processes share the console."""
from __future__ import annotations

import logging
import math
import os
import re
import warnings

import pytest
import torch

import train_svllreid
from config import ConfigError, load_config, settings_summary
from processor.meters import EpochMeters, hms
from processor.position import NonFiniteLossError
from tests.helpers import DEMO, ROOT, one_line_error, train_argv
from utils import misc
from utils.misc import AverageMeter, choose_device
from utils.record import NULL_RECORD


# ----------------------------------------------------------------------------- the device
def _no_cuda(monkeypatch, driver=None, warning=""):
    """This process sees no usable CUDA; ``driver``: the NVIDIA driver version installed (None: none);
    ``warning``: what torch warns when it tries."""
    def unavailable():
        if warning:
            warnings.warn(warning, UserWarning, stacklevel=2)
        return False
    monkeypatch.setattr(torch.cuda, "is_available", unavailable)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(misc, "nvidia_driver", lambda: driver)


def test_cuda_without_a_gpu_is_refused_in_one_line_before_anything_is_written(monkeypatch, tmp_path, capsys):
    _no_cuda(monkeypatch)
    out = tmp_path / "out"
    assert train_svllreid.main(train_argv(tmp_path / "data", out, "MODEL.DEVICE", "cuda")) == 2
    one_line_error(capsys, "MODEL.DEVICE = 'cuda'", "no NVIDIA driver", "MODEL.DEVICE cpu")
    assert not out.exists()


def test_a_driver_this_torch_build_cannot_use_is_named(monkeypatch):
    said = "CUDA initialization: The NVIDIA driver on your system is too old (found version 12020)."
    _no_cuda(monkeypatch, driver="535.54.03", warning=said)
    with pytest.raises(ConfigError) as e:
        choose_device("cuda:0")
    msg = str(e.value)
    for part in ("535.54.03", "built for CUDA 13.0", "too old (found version 12020)", "docs/usage.md"):
        assert part in msg, (part, msg)


def test_auto_takes_the_cpu_and_says_why(monkeypatch):
    _no_cuda(monkeypatch)
    device, note = choose_device("auto")
    assert device == torch.device("cpu")
    assert "the CPU" in note and "MODEL.DEVICE auto" in note and "no NVIDIA driver" in note


def test_device_values_are_checked_when_the_config_loads():
    assert load_config(DEMO, ["MODEL.DEVICE", "auto"]).MODEL.DEVICE == "auto"
    for bad in ("gpu", "cuda:x", "cuda:"):
        with pytest.raises(ConfigError, match="'auto'"):
            load_config(DEMO, ["MODEL.DEVICE", bad])


# ----------------------------------------------------------------------------- the settings summary
def test_the_settings_summary_is_short_and_names_the_full_config():
    cfg = load_config(os.path.join(ROOT, "configs/person/vit_svllreid.yml"))
    lines = settings_summary(cfg, "out/config.yaml")
    text = "\n".join(lines)
    assert len(lines) <= 8 and len(cfg.dump().splitlines()) > 100
    assert "out/config.yaml" in lines[0]
    for part in ("ViT-B-16", "market1501", "120 epochs", "60 epochs", "seed 1234"):
        assert part in text, part


# ----------------------------------------------------------------------------- the loss meters
def test_meters_leave_the_values_on_the_device_until_read(monkeypatch):
    """update() never reads a value on the host; read() gives exactly the float64 averages of
    reading every step, and stops at the first non-finite loss with its iteration."""
    meters = EpochMeters(2, ("loss", "acc"), NULL_RECORD)
    meters.start(3)
    steps = [(torch.tensor(2.0 / k, requires_grad=True) * 1.5, torch.tensor(k / 7.0), k + 1) for k in range(1, 6)]
    reads = []
    for name in ("item", "tolist", "__float__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda t, *a, _o=original, _n=name: reads.append(_n) or _o(t, *a))
    for loss, acc, n in steps:
        meters.update({"loss": loss, "acc": acc}, n)
    assert reads == []
    meters.read()
    assert reads == ["tolist"]
    ref = {"loss": AverageMeter(), "acc": AverageMeter()}
    for loss, acc, n in steps:
        ref["loss"].update(loss.item(), n)
        ref["acc"].update(acc.item(), n)
    assert meters["loss"] == ref["loss"].avg and meters["acc"] == ref["acc"].avg

    meters.update({"loss": torch.tensor(1.0), "acc": torch.tensor(0.5)}, 4)        # iteration 6
    meters.update({"loss": torch.tensor(float("nan")), "acc": torch.tensor(0.5)}, 4)   # iteration 7
    with pytest.raises(NonFiniteLossError, match=r"epoch 3, iteration 7: non-finite loss \(loss nan\)"):
        meters.read()


def test_timing_gives_the_stage_and_run_eta():
    meters = EpochMeters(1, ("loss",), NULL_RECORD)
    meters.plan(iterations_per_epoch=10, first_epoch=1, last_epoch=4)
    meters.start(1)
    meters.t0 -= 20.0                       # 20 s for the first 5 iterations: 4 s each, 35 to go
    for _ in range(5):
        meters.update({"loss": torch.tensor(1.0)}, 2)
    meters.later_seconds = 60.0
    text = meters.timing()
    assert re.match(r"4\.0\d\d s/iter, eta 0:02:2\d stage, 0:03:2\d run$", text), text
    meters.untimed = "stage 2"
    assert meters.timing().endswith("run plus stage 2, not timed yet")
    assert hms(3 * 3600 + 62.4) == "3:01:02"


# ----------------------------------------------------------------------------- a whole run's log
@pytest.mark.slow
def test_a_run_logs_device_settings_timing_and_a_summary(tiny_root, tmp_path, monkeypatch, capsys):
    """MODEL.DEVICE auto on this CPU machine: the log says the CPU; every log line has the iteration
    total, s/iter and the ETAs; the run ends with its time, best and final metrics and its files;
    no loss is read on the host in the steps (``.item()`` of a tensor with a graph)."""
    graph_reads = []
    item = torch.Tensor.item

    def counting_item(t):
        if t.grad_fn is not None:
            graph_reads.append(t.shape)
        return item(t)
    monkeypatch.setattr(torch.Tensor, "item", counting_item)
    out = tmp_path / "run"
    assert train_svllreid.main(train_argv(tiny_root, out, "MODEL.DEVICE", "auto",
                                          "SOLVER.STAGE2.LOG_PERIOD", "2")) == 0
    assert graph_reads == []
    console = capsys.readouterr().out
    log = (out / "train_log.txt").read_text()
    assert "Device: the CPU, chosen by MODEL.DEVICE auto" in log
    assert f"Settings, every key in {out / 'config.yaml'}" in log
    assert "CLIP_ARCH" not in console and "CLIP_ARCH" in (out / "config.yaml").read_text()   # no config dump

    eta = r"(\d+\.\d{3}) s/iter, eta \d+:\d\d:\d\d stage, \d+:\d\d:\d\d run"
    stage1 = re.findall(r"Stage1 epoch\[1\] iter\[(\d+)/(\d+)\] .*, " + eta + " plus stage 2, not timed yet", log)
    stage2 = re.findall(r"Stage2 epoch\[(\d)\] iter\[(\d+)/(\d+)\] .*, " + eta, log)
    assert stage1 and stage1[-1][0] == stage1[-1][1]          # the last line of the epoch: iteration = total
    assert len(stage2) == 2 and all(it == "2" and int(total) >= 2 for _, it, total, _ in stage2)
    assert "plus the evaluations, not timed yet" in stage2_line(log, 1)   # none timed yet in epoch 1

    tail = log.strip().splitlines()[-3:]
    assert re.search(r"Run finished in 0:\d\d:\d\d: stage 1 0:\d\d:\d\d; stage 2 with its evaluations", tail[0])
    from utils.record import read_metrics
    final = [r for r in read_metrics(str(out / "metrics.jsonl")) if r["kind"] == "eval"][-1]
    assert f"final at epoch 2: mAP {100 * final['mAP']:.1f}%, R1 {100 * final['R1']:.1f}%" in tail[1]
    assert f"Files in {out}: ViT-B-16_2.pth, results.json, last.pth, config.yaml" in tail[2]
    assert all(0 < float(seconds) < math.inf for *_, seconds in stage2)


def stage2_line(log: str, epoch: int) -> str:
    return next(ln for ln in log.splitlines() if f"Stage2 epoch[{epoch}] iter[" in ln)


# ----------------------------------------------------------------------------- whole console lines
class _Writes:
    """A stream that keeps each write call's text."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def write(self, s: str) -> int:
        self.calls.append(s)
        return len(s)

    def flush(self) -> None:
        pass


def test_each_log_line_goes_out_in_one_write(monkeypatch):
    """Two torchrun ranks share the console: a line written in pieces ('text', then the newline)
    can be glued to the other rank's line. Each line is one write; another rank's says whose it is."""
    import sys

    from utils.logger import setup_logger
    stream = _Writes()
    monkeypatch.setattr(sys, "stdout", stream)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(logging.getLogger(), "level", logging.getLogger().level)   # a rank's set-up lowers it
    log = setup_logger("svllreid", None, if_train=True, is_main=False)
    log.warning("first")
    log.error("second")
    lines = [c for c in stream.calls if c]
    assert len(lines) == 2 and all(c.endswith("\n") and c.count("\n") == 1 for c in lines), stream.calls
    assert " rank 1 WARNING: first" in lines[0] and " rank 1 ERROR: second" in lines[1]


def test_a_one_line_error_goes_out_in_one_write(monkeypatch):
    import sys

    from utils.entry import run_command
    from utils.errors import UserError
    stream = _Writes()
    monkeypatch.setattr(sys, "stderr", stream)

    def fail():
        raise UserError("bad thing")
    assert run_command(fail, (UserError,)) == 2
    assert [c for c in stream.calls if c] == ["error: bad thing\n"]
