"""Exits and signals: SIGINT, SIGTERM and SIGHUP stop ``hil train`` over visa:// in order
(the host's own OUTP OFF after the last pulse, a consistent checkpoint), exit 130 / 143 /
129 with one line saying how to resume; and the resumed run continues on the same chip."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import yaml
from childproc import default_signals

from drivers.virtual_chip import VirtualChip
from hil.cli import main

CHIP = "sim://?model=power&gamma=0.5&tau=0.6&c2c=0.1&read_noise=0.001&seed=3"
CONFIG = {
    "name": "sig", "seed": 1, "backend": "sim://",
    "model": {"hidden": [4], "activation": "tanh"},
    "data": {"name": "least_squares", "n_inputs": 6, "n_outputs": 2, "limit_train": 60,
             "limit_test": 20},
    "algorithm": {"name": "rlv2", "lr": 0.1, "transfer_lr": 0.2, "gamma": 0.1},
    "train": {"epochs": 3, "batch_size": 10, "checkpoint_every": 4},
}
EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129}


def hil_child(args: list[str]) -> subprocess.Popen:
    code = f"from hil.cli import main; main({args!r})"
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=default_signals)


def wait_for_training(fw, proc, out, n: int = 3, timeout: float = 60.0) -> None:
    """Until the run has its step-0 checkpoint and sent n more pulse commands."""
    deadline = time.monotonic() + timeout
    start = None
    while start is None or sum(e.startswith("PULSE") for e in fw.log[start:]) < n:
        if start is None and (out / "checkpoint.pt").exists():
            start = len(fw.log)
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "training never reached the chip"
        time.sleep(0.02)


@pytest.mark.parametrize("sig", list(EXIT), ids=lambda s: s.name)
def test_signal_stops_train_in_order_and_says_how_to_resume(tmp_path, sig):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(CONFIG))
    out = tmp_path / "out"
    with VirtualChip(CHIP, "scpi", "tcp") as chip:
        fw = chip.firmware
        proc = hil_child(["train", str(cfg), "--backend", chip.url, "--out", str(out),
                          "--quiet"])
        try:
            wait_for_training(fw, proc, out)
            proc.send_signal(sig)
            if sig == signal.SIGINT:  # pressed twice: the stop still runs to its end
                time.sleep(0.05)
                proc.send_signal(sig)
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == EXIT[sig], err
        lines = [line for line in err.splitlines()
                 if line.strip() and not line.endswith("already stopping (outputs going off)")]
        assert len(lines) == 1, err
        assert lines[0].startswith(f"interrupted by {sig.name}: hil train stopped, outputs off")
        assert f"hil train {cfg} --out {out} --resume" in lines[0]
        last_pulse = max(i for i, e in enumerate(fw.log) if e.startswith("PULSE"))
        assert "OUTP OFF" in fw.log[last_pulse:], fw.log[-5:]  # the host's, not the watchdog's
        assert not fw.outputs
        assert (out / "checkpoint.pt").exists() and not (out / "checkpoint.pt.tmp").exists()
        if sig == signal.SIGTERM:  # the checkpoint is where it stopped: resume on the chip
            assert main_exit(["train", str(cfg), "--backend", chip.url, "--out", str(out),
                              "--quiet", "--resume"]) == 0
            assert (out / "curves.png").exists()


def test_interrupted_before_the_first_checkpoint_says_rerun(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(CONFIG))
    out = tmp_path / "out"
    with VirtualChip(CHIP, "scpi", "tcp") as chip:
        fw = chip.firmware
        proc = hil_child(["train", str(cfg), "--backend", chip.url, "--out", str(out),
                          "--quiet"])
        try:  # the initial write-verify programming is under way
            deadline = time.monotonic() + 60
            while not any(e.startswith("PULSE") for e in fw.log):
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.01)
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 143, err
        assert f"nothing to resume yet; rerun: hil train {cfg} --out {out}" in err
        last_pulse = max(i for i, e in enumerate(fw.log) if e.startswith("PULSE"))
        assert "OUTP OFF" in fw.log[last_pulse:] and not fw.outputs
        # and the rerun it suggests works (nothing left that blocks it)
        code = main_exit(["train", str(cfg), "--backend", chip.url, "--out", str(out),
                          "--quiet"])
        assert code == 0


def main_exit(args: list[str]) -> int:
    """The exit code ``hil ARGS`` would give (run in this process)."""
    try:
        main(args)
    except SystemExit as exc:
        return exc.code or 0
    return 0


def test_main_puts_back_the_signal_handlers_it_replaced(tmp_path):
    before = {sig: signal.getsignal(sig) for sig in EXIT}
    assert main_exit(["fit", str(tmp_path / "missing.h5")]) == 2
    assert {sig: signal.getsignal(sig) for sig in EXIT} == before


def test_a_stop_signal_inside_a_deferred_block_waits_for_its_end():
    from hil import interrupts

    previous = interrupts.install()
    done = []
    try:
        with pytest.raises(interrupts.Interrupted) as exc:
            with interrupts.deferred():
                signal.raise_signal(signal.SIGTERM)
                done.append("the step ran to its end")
        assert done and exc.value.signum == signal.SIGTERM and exc.value.exit_code == 143
    finally:
        interrupts.restore(previous)
        interrupts.reset()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_serve_virtual_chip_stops_normally_on_sigterm_and_sighup(sig):
    proc = hil_child(["serve-virtual-chip", "--pty", "--backend", "sim://?seed=4"])
    try:
        assert proc.stdout.readline().startswith("serial:///dev/"), proc.stderr.read()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "0 device-pulses applied, outputs off" in err
