"""Ctrl-C (SIGINT) during a long pulse sequence leaves the chip's outputs off and the
measurement file readable; and the ``hil serve-virtual-chip`` command end to end."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest
import torch
from childproc import default_signals

from drivers.virtual_chip import VirtualChip
from hil.backend import open_backend

MEASURE = textwrap.dedent("""
    import sys, h5py, torch
    from hil.backend import open_backend
    url, path = sys.argv[1], sys.argv[2]
    with open_backend(url) as be, h5py.File(path, "w") as f:
        tile = be.allocate("ctrlc", 32, 32)
        ds = f.create_dataset("w", shape=(0, 32, 32), maxshape=(None, 32, 32), dtype="f4",
                              chunks=(1, 32, 32))
        up = torch.full((32, 32), 30, dtype=torch.int32)
        i = 0
        while True:
            tile.pulse(up if i % 2 == 0 else -up)
            ds.resize(i + 1, axis=0)
            ds[i] = tile.read().numpy()
            f.flush()
            if i == 2:
                print("running", flush=True)
            i += 1
""")


@pytest.mark.parametrize("protocol, transport", [("scpi", "tcp"), ("serial", "pty")])
def test_sigint_during_pulses_leaves_outputs_off_and_file_readable(tmp_path, protocol,
                                                                    transport):
    script = tmp_path / "measure.py"
    script.write_text(MEASURE)
    path = tmp_path / "measure.h5"
    with VirtualChip("sim://?model=power&gamma=0.5&c2c=0.1&seed=1", protocol,
                     transport) as chip:
        proc = subprocess.Popen([sys.executable, str(script), chip.url, str(path)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=default_signals)
        try:
            assert proc.stdout.readline() == "running\n", proc.stderr.read()
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
        fw = chip.firmware
        assert proc.returncode != 0 and "KeyboardInterrupt" in err
        assert not fw.outputs, err
        last_pulse = max(i for i, e in enumerate(fw.log) if e.startswith("PULSE"))
        assert "OUTP OFF" in fw.log[last_pulse:]  # sent by the driver, not the watchdog
    with h5py.File(path, "r") as f:
        w = f["w"][()]
    assert w.shape[0] >= 3 and np.isfinite(w).all()


def test_serve_virtual_chip_command(tmp_path):
    from hil.cli import app

    # typer runs a lone command without its name; with sibling commands it needs it
    name = ["serve-virtual-chip"] if len(app.registered_commands) > 1 else []
    code = f"from hil.cli import main; main({name + ['--pty', '--backend', 'sim://?seed=4']!r})"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=default_signals)
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("serial:///dev/"), proc.stderr.read()
        with open_backend(url) as be:
            tile = be.allocate("cli", 2, 2)
            tile.pulse(torch.ones(2, 2, dtype=torch.int32))
            assert tile.read().shape == (2, 2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    assert "4 device-pulses applied, outputs off" in err


def test_serve_virtual_chip_needs_port_or_pty(capsys):
    from hil.cli import app, main

    name = ["serve-virtual-chip"] if len(app.registered_commands) > 1 else []
    for args in ([], ["--pty", "--port", "0"]):
        with pytest.raises(SystemExit) as exc:
            main(name + args)
        assert exc.value.code == 2
        assert "give exactly one of them" in capsys.readouterr().err
