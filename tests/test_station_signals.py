"""A station job stopped by SIGINT, SIGTERM or SIGHUP leaves the instruments safe from the
host: SMU output off and every relay open (the served simulated station is the witness)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
from childproc import default_signals

from drivers.station.profile import load_station_profile
from drivers.station.sim.server import StationServer

EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_signal_leaves_the_station_safe(tmp_path, sig):
    name = "keysight-b2900-b2200"
    with StationServer(load_station_profile(name), name, "sim://?seed=1") as server:
        args = ["characterize", "--backend", server.url, "--out", str(tmp_path / "m.h5"),
                "--rows", "4", "--cols", "4", "--pulses", "400", "--quiet"]
        proc = subprocess.Popen([sys.executable, "-c", f"from hil.cli import main; main({args!r})"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=default_signals)
        chip, smu = server.sim.chip, server.sim.smu
        deadline = time.monotonic() + 60
        while chip.device_pulses < 20 and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.02)
        assert smu.channels[1].output  # mid-job: the output is on
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == EXIT[sig], err
        with server.lock:
            assert not smu.channels[1].output, err
            assert not server.sim.matrix.closed
        assert not (tmp_path / "m.h5").exists()  # nothing half-written under the name
