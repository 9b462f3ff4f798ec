"""One controlling host per chip: a second host is refused (the error names the holder) or
takes over explicitly, after which the first host's next call raises; sequence numbers
belong to the session, so no call is ever answered from another host's cached reply."""

from __future__ import annotations

import pytest
import torch

from drivers.link import SessionRefused
from drivers.virtual_chip import VirtualChip
from hil.backend import open_backend
from hil.errors import BackendError, BackendURLError

CHIP = "sim://?model=power&gamma=0.5&c2c=0.1&seed=3"
WIRES = [("scpi", "tcp"), ("serial", "tcp")]


def with_param(url: str, param: str) -> str:
    return url + ("&" if "?" in url else "?") + param


@pytest.mark.parametrize("protocol, transport", WIRES)
def test_second_host_is_refused_naming_the_holder(protocol, transport):
    with VirtualChip(CHIP, protocol, transport) as chip:
        with open_backend(chip.url) as a:
            tile = a.allocate("t", 2, 2)
            with pytest.raises(SessionRefused, match=r"chip held by .* pid \d+"):
                open_backend(chip.url)
            tile.pulse(torch.ones(2, 2, dtype=torch.int32))  # the holder is undisturbed
            assert chip.firmware.device_pulses == 4
        with open_backend(chip.url) as b:  # a clean close frees the chip
            assert b.tile("t").shape == (2, 2)


@pytest.mark.parametrize("protocol, transport", WIRES)
def test_take_over_makes_the_first_hosts_next_call_raise(protocol, transport):
    with VirtualChip(CHIP, protocol, transport) as chip:
        fw = chip.firmware
        a = open_backend(chip.url)
        ta = a.allocate("t", 2, 2)
        ta.pulse(torch.full((2, 2), 5, dtype=torch.int32))
        assert fw.outputs
        with open_backend(with_param(chip.url, "take_over=1")) as b:
            assert not fw.outputs and fw.log[-1] == "OUTP OFF (take-over)"
            tb = b.tile("t")
            tb.pulse(torch.ones(2, 2, dtype=torch.int32))
            before = fw.device_pulses
            for call in (lambda: ta.pulse(torch.full((2, 2), 5, dtype=torch.int32)),
                         lambda: ta.read(), lambda: a.allocate("u", 1, 1)):
                with pytest.raises(SessionRefused, match="taken over by"):
                    call()
            assert fw.device_pulses == before  # nothing of the old host's was applied
            assert fw.outputs  # and its make_safe did not ground the new host's outputs
            tb.pulse(torch.ones(2, 2, dtype=torch.int32))
            assert fw.device_pulses == before + 4
            a.close()  # the old host's close neither raises nor touches the chip
            assert fw.outputs
        assert not fw.outputs


@pytest.mark.parametrize("protocol, transport", WIRES)
def test_no_silent_loss_every_call_applied_or_raised(protocol, transport):
    """The original bug: host A's pulse(5) returned while the chip answered it from host
    B's cached reply. Now each pulse of either host is applied or raises."""
    with VirtualChip(CHIP, protocol, transport) as chip:
        fw = chip.firmware
        a = open_backend(chip.url)
        ta = a.allocate("t", 1, 1)
        b = open_backend(with_param(chip.url, "take_over=1"))
        tb = b.tile("t")
        applied = 0
        for i in range(6):
            tile, n = (ta, 5) if i % 2 else (tb, 1)
            before = fw.device_pulses
            try:
                tile.pulse(torch.full((1, 1), n, dtype=torch.int32))
            except BackendError:
                assert fw.device_pulses == before
                continue
            assert fw.device_pulses == before + n
            applied += n
        assert applied == 3 and fw.device_pulses == 3
        a.close()
        b.close()


def test_dropped_host_keeps_the_chip_until_taken_over():
    with VirtualChip(CHIP, "scpi", "tcp") as chip:
        fw = chip.firmware
        a = open_backend(chip.url)
        a.allocate("t", 1, 1).pulse(torch.ones(1, 1, dtype=torch.int32))
        a.link.transport.close()  # the host dies without a clean close
        with pytest.raises(SessionRefused, match="chip held by"):
            open_backend(chip.url)
        with open_backend(with_param(chip.url, "take_over=1")) as b:
            b.tile("t").pulse(torch.ones(1, 1, dtype=torch.int32))
        log = fw.session_log
        assert log[0].startswith("OPEN 1 ") and log[1].startswith("END 1 taken over by")
        assert log[2].startswith("OPEN 2 ") and log[-1] == "END 2 closed by its host"


def test_sequence_numbers_are_scoped_to_the_session():
    with VirtualChip(CHIP, "scpi", "tcp") as chip:
        with open_backend(chip.url) as a:
            tile = a.allocate("t", 1, 1)
            for _ in range(3):
                tile.read()
            assert a.seq == 4
        with open_backend(chip.url) as b:
            assert b.seq == 0  # a new session counts from the start
            b.tile("t").read()
            assert b.seq == 1


def test_a_pty_serves_one_host_process():
    with VirtualChip(CHIP, "serial", "pty") as chip:
        with open_backend(chip.url):
            with pytest.raises(BackendError, match="lock|held by"):
                open_backend(chip.url)


def test_take_over_url_parameter_is_checked():
    with pytest.raises(BackendURLError, match="take_over"):
        open_backend("visa://TCPIP0::127.0.0.1::9::SOCKET?take_over=yes")


def test_two_visa_backends_in_one_process_are_independent():
    """Closing one visa:// backend left the other with a closed pyvisa ResourceManager:
    its next call raised a raw InvalidSession and its outputs stayed on."""
    with VirtualChip(CHIP, "scpi", "tcp") as c1, VirtualChip(CHIP, "scpi", "tcp") as c2:
        a, b = open_backend(c1.url), open_backend(c2.url)
        ta, tb = a.allocate("t", 1, 1), b.allocate("t", 1, 1)
        ta.pulse(torch.ones(1, 1, dtype=torch.int32))
        tb.pulse(torch.ones(1, 1, dtype=torch.int32))
        a.close()
        assert not c1.firmware.outputs
        tb.pulse(torch.ones(1, 1, dtype=torch.int32))
        assert tb.read().shape == (1, 1) and c2.firmware.device_pulses == 2
        assert c2.firmware.outputs
        b.close()
        assert not c2.firmware.outputs and c2.firmware.log[-1] == "OUTP OFF"


def test_cli_on_a_held_chip_is_one_line_and_writes_nothing(tmp_path, capsys):
    from hil.cli import main

    out = tmp_path / "m.h5"
    with VirtualChip(CHIP, "scpi", "tcp") as chip, open_backend(chip.url):
        with pytest.raises(SystemExit) as exc:
            main(["characterize", "--backend", chip.url, "--out", str(out), "--rows", "2",
                  "--cols", "2", "--quiet"])
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "chip held by" in err and "--take-over" in err
        assert list(tmp_path.iterdir()) == []


def test_a_hostile_second_connection_cannot_touch_the_holder():
    """A raw SCPI connection outside the session: its OUTP OFF, *CLS, pulses, garbage and
    non-ASCII session requests are refused in its own queue; the holder sees nothing."""
    import socket

    with VirtualChip(CHIP, "scpi", "tcp") as chip:
        fw = chip.firmware
        with open_backend(chip.url) as a:
            tile = a.allocate("t", 1, 1)
            tile.pulse(torch.ones(1, 1, dtype=torch.int32))
            port = int(chip.address.rsplit(":", 1)[1])
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                f = s.makefile("rb")
                s.sendall(b"OUTP OFF\n*CLS\nPULS:POT 0.1,1e-6,1e-4\nBOGUS \xff\xfe\n"
                          b"SYST:SESS? 0,0,mall\xc3\xb6ry\n")
                assert f.readline().startswith(b'102,"chip held by')
                s.sendall(b"SYST:SESS? 0,0,\xff\n")  # non-ASCII holder: still refused
                assert f.readline().startswith(b"102,")
                s.sendall(b"SYST:SESS? x\xff,1\n")
                assert f.readline().startswith(b'-224,"bad session request')
                s.sendall(b"TILE:PULS:DEV? 1,t,0,0,5\n")
                assert b",+102,#" in f.readline()
                errors = []
                for _ in range(4):
                    s.sendall(b"SYST:ERR?\n")
                    errors.append(f.readline())
                assert all(e.isascii() for e in errors)
                assert errors[0].startswith(b"102,") and errors[-1] == b'0,"No error"\n'
            assert fw.outputs and fw.device_pulses == 1
            tile.pulse(torch.ones(1, 1, dtype=torch.int32))  # undisturbed, no stray error
            a.set_pulse_shape("potentiate", 1.0, 1e-6, 1e-4)  # re-arm reads the error queue
            tile.pulse(torch.ones(1, 1, dtype=torch.int32))
            assert fw.device_pulses == 3
