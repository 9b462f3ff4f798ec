"""The simulated station served as VISA resources on loopback TCP: plain pyvisa-py talks to
it, the station driver runs over it, and a second controlling client is refused."""

from __future__ import annotations

import socket
import time

import pyvisa
import torch

from drivers.station.profile import load_station_profile
from drivers.station.sim.server import StationServer
from hil.backend import open_backend


def _open(rm, resource):
    inst = rm.open_resource(resource)
    inst.read_termination = "\n"
    inst.write_termination = "\n"
    inst.timeout = 5000
    return inst


def test_plain_pyvisa_and_the_driver_over_sockets():
    name = "keysight-b2900-b2200"
    with StationServer(load_station_profile(name), name, "sim://?seed=1") as server:
        rm = pyvisa.ResourceManager("@py")
        smu = _open(rm, server.resources["smu"])
        matrix = _open(rm, server.resources["matrix"])
        try:
            assert "B2902B" in smu.query("*IDN?")
            matrix.write(":ROUT:CLOS (@10101,20205)")  # a lab script routes device (0, 4)
            assert matrix.query(":ROUT:CLOS:CARD? 1") == "(@10101)"
            smu.write(":SOUR1:VOLT 0.1;:OUTP1 ON")
            current = float(smu.query(":MEAS:CURR? (@1)"))
            assert 1e-7 < current < 1e-5  # G in 1 uS .. 100 uS at 0.1 V
            smu.write(":SOUR1:VOLT 1e6")
            assert smu.query(":SYST:ERR?").startswith("-222,")
            smu.write(":OUTP1 OFF")
            matrix.write(":ROUT:OPEN:CARD ALL")
            assert matrix.query("*OPC?") == "1"
            # a second controlling client is refused while the first is connected
            other = socket.create_connection(("127.0.0.1", int(server.resources["smu"]
                                                                .split("::")[2])))
            other.settimeout(2)
            assert other.recv(16) == b""  # closed by the instrument
            other.close()
        finally:
            smu.close()
            matrix.close()
            rm.close()
        time.sleep(0.3)  # the sessions end; the driver may take control
        with open_backend(server.url) as be:
            tile = be.allocate("t", 2, 2)
            tile.pulse(torch.ones(2, 2, dtype=torch.int32))
            assert torch.isfinite(tile.read()).all()
        sim = server.sim
        assert not sim.smu.channels[1].output and not sim.matrix.closed  # left safe
        assert sim.chip.device_pulses == 4


def test_keithley_station_over_sockets():
    name = "keithley-2600b-707b"
    with StationServer(load_station_profile(name), name, "sim://?seed=1") as server:
        rm = pyvisa.ResourceManager("@py")
        smu = _open(rm, server.resources["smu"])
        try:
            assert "2602B" in smu.query("*IDN?")
            assert smu.query("print(smua.source.output)").startswith("0")
            smu.write("smua.source.levelv = 100")
            assert smu.query("print(errorqueue.next())").startswith("1101\t")
        finally:
            smu.close()
            rm.close()
        time.sleep(0.3)
        with open_backend(server.url) as be:
            tile = be.allocate("t", 2, 2)
            tile.pulse(-torch.ones(2, 2, dtype=torch.int32))
            assert torch.isfinite(tile.read()).all()
        assert server.sim.smu.s["output"] == 0 and not server.sim.matrix.closed


def test_serve_virtual_chip_station_cli(capsys):
    from hil.cli import main

    main(["serve-virtual-chip", "--station", "keithley-2600b-707b", "--duration", "0.3"])
    out = capsys.readouterr()
    assert out.out.startswith("station://keithley-2600b-707b?smu=TCPIP0::127.0.0.1::")
    assert "matrix: TCPIP0::127.0.0.1::" in out.err and "stopped:" in out.err


def test_one_host_per_station_on_real_visa_resources():
    import pytest

    from drivers.station.dialect import VisaConnection
    from hil.errors import BackendError, BackendURLError

    class Held:  # a resource another host holds under a VISA exclusive lock
        def lock_excl(self, timeout):
            raise pyvisa.errors.VisaIOError(pyvisa.constants.StatusCode.error_resource_locked)

        def close(self):
            pass

    conn = VisaConnection.__new__(VisaConnection)
    conn.name, conn._inst, conn._rm = "GPIB0::23::INSTR", Held(), Held()
    with pytest.raises(BackendError, match="held by another host"):
        conn._lock(pyvisa, 1.0)
    # a lock cannot be taken over: one line saying so (the CLI's --take-over adds take_over=1
    # at the end of the URL; it stays the station's, not the simulated chip's)
    with pytest.raises(BackendURLError, match="take over"):
        open_backend("station://keysight-b2900-b2200?sim=sim://?seed=1&take_over=1")
