"""End to end through real sockets and ptys: the same seeded training on sim://, on visa://
to the virtual chip and on serial:// over a pty gives bit-identical weights, also with
dropped replies, corrupted replies and a forced disconnect (no pulse lost, none doubled)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from drivers.virtual_chip import Faults, VirtualChip, running
from drivers.weight_map import write_weight_map
from hil.backend import open_backend
from hil.errors import BackendURLError, ConfigError, SafetyLimitError

SIM = "sim://?model=power&gamma=0.5&tau=0.6&d2d=0.2&c2c=0.1&read_noise=0.005&seed=7"
TIMEOUT = 0.2  # short, so that each dropped reply costs little; late replies are handled


def rlv2_run(url: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A small seeded Residual Learning v2 run towards a fixed target."""
    from hil.algorithms import ResidualLearningV2

    with open_backend(url) as be:
        alg = ResidualLearningV2(be, (6, 8), lr=0.1, transfer_lr=0.3, gamma=0.5, seed=3,
                                 prefix="fc1")
        target = torch.linspace(-0.3, 0.3, 48).reshape(6, 8)
        for _ in range(25):
            alg.step(alg.weight() - target)
        return alg.read("W"), alg.read("P")


def scripted_run(url: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded pulse/read/MVM sequence independent of the training code."""
    gen = torch.Generator().manual_seed(11)
    with open_backend(url) as be:
        a, b = be.allocate("a", 5, 7), be.allocate("b", 3, 4)
        for _ in range(30):
            a.pulse(torch.randint(-4, 5, (5, 7), generator=gen, dtype=torch.int32))
            b.pulse(torch.randint(-2, 3, (3, 4), generator=gen, dtype=torch.int32))
            w = a.read()
        y = a.mvm(torch.randn(2, 7, generator=gen)) if be.capabilities.mvm else a.read()
        return w, torch.cat([y.reshape(-1), b.read().reshape(-1)])


@pytest.fixture(scope="module")
def reference():
    return {"rlv2": rlv2_run(SIM), "scripted": scripted_run(SIM)}


def same(x, y) -> bool:
    return all(torch.equal(a, b) for a, b in zip(x, y, strict=True))


@pytest.mark.parametrize("protocol, transport", [("scpi", "tcp"), ("serial", "pty"),
                                                 ("serial", "tcp"), ("scpi", "pty")])
def test_scripted_sequence_bit_identical(reference, protocol, transport):
    with running(SIM, protocol, transport) as url:
        assert url.startswith("visa://" if protocol == "scpi" else "serial://")
        assert same(scripted_run(url), reference["scripted"])


@pytest.mark.parametrize("protocol, transport", [("scpi", "tcp"), ("serial", "pty")])
def test_rlv2_bit_identical_on_sim_visa_and_serial_pty(reference, protocol, transport):
    with VirtualChip(SIM, protocol, transport) as chip:
        result = rlv2_run(chip.url)
        assert chip.firmware.replayed == 0
    assert same(result, reference["rlv2"])


@pytest.mark.parametrize("protocol, transport", [("scpi", "tcp"), ("serial", "pty")])
def test_rlv2_bit_identical_with_dropped_replies_and_a_disconnect(reference, protocol,
                                                                  transport):
    with VirtualChip(SIM, protocol, transport) as clean:
        rlv2_run(clean.url)
        clean_pulses = clean.firmware.device_pulses
        clean_log = [e for e in clean.firmware.log if e.startswith("PULSE")]
    faults = Faults(drop=0.05, close_after=60, seed=5)
    with VirtualChip(SIM, protocol, transport, faults=faults, timeout_s=TIMEOUT) as chip:
        result = rlv2_run(chip.url)
        fw = chip.firmware
    assert same(result, reference["rlv2"])
    assert faults.dropped > 0 and faults.disconnects == 1 and fw.replayed > 0
    # exactly once: the same pulse commands, each applied once, none lost
    assert fw.device_pulses == clean_pulses
    assert [e for e in fw.log if e.startswith("PULSE")] == clean_log
    assert not fw.outputs and fw.log[-1] == "OUTP OFF"


def test_scripted_bit_identical_with_corrupted_replies(reference):
    faults = Faults(drop=0.05, corrupt=0.05, close_after=25, seed=2)
    with VirtualChip(SIM, "serial", "tcp", faults=faults, timeout_s=TIMEOUT) as chip:
        assert same(scripted_run(chip.url), reference["scripted"])
    assert faults.corrupted > 0
    faults = Faults(corrupt=0.08, seed=4)
    with VirtualChip(SIM, "scpi", "tcp", faults=faults, timeout_s=TIMEOUT) as chip:
        assert same(scripted_run(chip.url), reference["scripted"])
    assert faults.corrupted > 0


def test_calibration_weight_map(tmp_path):
    """w = (G - G_ref) / weight_scale; a negative scale flips the pulse polarity."""
    g_ref = np.full((2, 3), 0.1)
    path = tmp_path / "calib.h5"
    write_weight_map(str(path), {"cal": (g_ref, -0.5)})
    with VirtualChip("sim://?seed=1") as chip:
        with open_backend(f"{chip.url}&calib={path}") as be:
            tile = be.allocate("cal", 2, 3)
            assert tile.dw_min == pytest.approx(2e-3)
            g0 = chip.backend.tile("cal").w.clone()
            assert torch.allclose(tile.read(), ((g0 - 0.1) * -2.0).float())
            tile.pulse(torch.ones(2, 3, dtype=torch.int32))
            assert bool((chip.backend.tile("cal").w < g0).all())  # G went down, w up
            x = torch.tensor([[1.0, 2.0, -1.0]])
            expect = x @ ((chip.backend.tile("cal").w.double() - 0.1) * -2.0).float().t()
            assert torch.allclose(tile.mvm(x), expect, atol=0.5)  # paper I/O: 7/9-bit, noise
        with pytest.raises(ConfigError, match="tiles/other"):
            with open_backend(f"{chip.url}&calib={path}") as be:
                be.allocate("other", 1, 1)


def test_url_errors_before_any_connection(tmp_path):
    # port 9 on loopback has no listener: these must fail before trying to connect
    with pytest.raises(BackendURLError, match="unknown parameter"):
        open_backend("visa://TCPIP0::127.0.0.1::9::SOCKET?profil=virtual")
    with pytest.raises(BackendURLError, match="baud"):
        open_backend("serial://socket://127.0.0.1:9?baud=fast")
    with pytest.raises(ConfigError, match="calib"):
        open_backend(f"serial://socket://127.0.0.1:9?calib={tmp_path / 'missing.h5'}")


def test_tiles_persist_on_the_chip_across_sessions():
    with VirtualChip("sim://?seed=2", "serial", "pty") as chip:
        with open_backend(chip.url) as be:
            be.allocate("keep", 4, 4).pulse(torch.ones(4, 4, dtype=torch.int32))
            w = be.tile("keep").read()
        with open_backend(chip.url) as be:
            assert torch.equal(be.tile("keep").read(), w)
            assert be.tile("keep").dw_min == 1e-3


@pytest.mark.parametrize("protocol, transport", [("scpi", "tcp"), ("serial", "pty")])
def test_single_device_pulses_match_pulse_maps(protocol, transport):
    url = "sim://?model=power&gamma=0.5&c2c=0.1&seed=9"
    with open_backend(url) as be:
        tile = be.allocate("d", 3, 3)
        for row, col, count in [(0, 1, 3), (2, 2, -2), (0, 1, -1)]:
            n = torch.zeros(3, 3, dtype=torch.int32)
            n[row, col] = count
            tile.pulse(n)
        expect = tile.read()
    with running(url, protocol, transport) as chip_url, open_backend(chip_url) as be:
        tile = be.allocate("d", 3, 3)
        for row, col, count in [(0, 1, 3), (2, 2, -2), (0, 1, -1)]:
            tile.pulse_device(row, col, count)
        assert torch.equal(tile.read(), expect)
        with pytest.raises(SafetyLimitError):
            tile.pulse_device(1, 1, 5000)


def rlv2_outer_run(url: str) -> tuple[torch.Tensor, torch.Tensor]:
    """RLv2 fed layer inputs and output gradients: the chip's rank-1 pulse-train update."""
    from hil.algorithms import ResidualLearningV2

    gen = torch.Generator().manual_seed(5)
    with open_backend(url) as be:
        assert be.capabilities.outer_update
        alg = ResidualLearningV2(be, (4, 5), lr=0.05, transfer_lr=0.3, gamma=0.5, seed=1,
                                 prefix="l")
        for _ in range(8):
            alg.step(x=torch.randn(6, 5, generator=gen), d=torch.randn(6, 4, generator=gen))
        return alg.read("W"), alg.read("P")


@pytest.mark.parametrize("protocol, transport", [("scpi", "tcp"), ("serial", "pty")])
def test_outer_update_bit_identical(protocol, transport):
    expect = rlv2_outer_run(SIM)
    with VirtualChip(SIM, protocol, transport) as chip:
        assert same(rlv2_outer_run(chip.url), expect)
        assert any(e.startswith("OUTER") for e in chip.firmware.log)


def test_running_binds_loopback_and_stops_on_exit():
    import socket

    with pytest.raises(RuntimeError, match="inside"):
        with running("sim://", "scpi") as url:
            port = int(url.split("::")[2])
            with socket.create_connection(("127.0.0.1", port), timeout=2):
                pass
            raise RuntimeError("inside the block")
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


@pytest.mark.parametrize("protocol, transport", [("scpi", "tcp"), ("serial", "pty")])
def test_late_replies_are_discarded(reference, protocol, transport):
    """Replies later than the timeout arrive after the retry went out: never mistaken."""
    faults = Faults(delay_s=0.3, delay_fraction=0.06, seed=8)
    with VirtualChip(SIM, protocol, transport, faults=faults, timeout_s=TIMEOUT) as chip:
        assert same(scripted_run(chip.url), reference["scripted"])
        assert chip.firmware.replayed > 0
    assert faults.delayed > 0


def test_mcu_board_profile_int8_and_fixed_placement():
    """The shipped MCU-board profile: int8 counts, 100 per command, fc1.W placed at (0, 0)."""
    with VirtualChip("sim://?seed=3", "serial", "pty", profile="mcu-board") as chip:
        with open_backend(chip.url) as be:
            assert be.capabilities.max_pulses_per_command == 100
            tile = be.allocate("fc1.W", 8, 8)
            assert chip.firmware.placements["fc1.W"].row == 0
            tile.pulse(torch.full((8, 8), -100, dtype=torch.int32))
            with pytest.raises(SafetyLimitError):
                tile.pulse(torch.full((8, 8), 101, dtype=torch.int32))
            with pytest.raises(SafetyLimitError):
                be.allocate("big", 65, 1)
            assert chip.firmware.device_pulses == 6400
