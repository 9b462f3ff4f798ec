"""The virtual chip under hostile bytes (a block header announcing gigabytes, non-ASCII
garbage), the host splitting large MVM batches, and a ``hil train`` over visa:// whose
absurd learning rate is refused by the per-step budget instead of running away."""

from __future__ import annotations

import socket
import time

import numpy as np
import pytest
import torch
import yaml

from drivers.chip_handlers import ScpiHandler, Session
from drivers.firmware import ChipFirmware
from drivers.link import MAX_BATCH
from drivers.profile import load_profile
from drivers.virtual_chip import VirtualChip, loopback_backend
from hil.backend import open_backend
from hil.cli import main
from hil.errors import SafetyLimitError


@pytest.fixture
def session():
    inner = open_backend("sim://")
    fw = ChipFirmware(inner, load_profile("virtual"))
    yield Session(ScpiHandler(fw), None), fw
    inner.close()


def ask(sess: Session, text: bytes) -> bytes:
    return b"".join(sess.feed(text)[0])


def test_max_block_follows_the_profile(session):
    _, fw = session
    assert fw.max_block == 4 * MAX_BATCH * (1024 + 1024)  # an MVM batch on a 1024x1024 array


@pytest.mark.parametrize("header", [b"#9999999999", b"#9100000000", b"#8" + b"%08d" % (40 << 20)])
def test_oversized_block_is_refused_and_never_buffered(session, header):
    sess, fw = session
    sess.feed(b"TILE:PULS? 1,x," + header)
    chunk = b"\x01" * (1 << 20)
    for _ in range(48):  # 48 MiB of block bytes: dropped as they arrive
        replies, close = sess.feed(chunk)
        assert not replies and not close
        assert len(sess.buf) <= 64
    assert fw.errors and "exceeds the largest" in fw.errors[0][1]
    assert len(fw.errors) <= fw.errors.maxlen  # junk after the block: bounded errors
    assert fw.device_pulses == 0 and not fw.log


def test_after_a_refused_block_the_stream_is_in_step_again(session):
    sess, fw = session
    n = fw.max_block + 10
    sess.feed(b"TILE:PULS? 1,x,#9" + b"%09d" % n)
    for _ in range(n // (1 << 20)):
        sess.feed(b"\x00" * (1 << 20))
    sess.feed(b"\x00" * (n % (1 << 20)) + b"\n")
    assert ask(sess, b"*IDN?\n").startswith(b"analog-hil,virtual-chip")
    err = ask(sess, b"SYST:ERR?\n").decode("ascii")
    assert err.startswith("-224,") and f"block of {n} bytes" in err


def test_a_refused_block_is_forgotten_after_the_interbyte_timeout(session):
    sess, _ = session
    sess.feed(b"TILE:PULS? 1,x,#9999999999")
    sess.feed(b"\x00" * 1000)
    time.sleep(0.25)  # a host that gave up; the firmware discards the partial request
    assert ask(sess, b"*IDN?\n").startswith(b"analog-hil")


def test_a_runaway_command_line_is_never_buffered(session):
    sess, fw = session
    for _ in range(16):
        sess.feed(b"A" * (1 << 20))
        assert len(sess.buf) <= 4096
    sess.feed(b"\n")
    assert ask(sess, b"*IDN?\n").startswith(b"analog-hil")
    assert "longer than 4096" in fw.errors[0][1]


def recv_line(sock: socket.socket, timeout: float = 5.0) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while not data.endswith(b"\n"):
        part = sock.recv(4096)
        if not part:
            raise ConnectionError(f"connection closed after {data!r}")
        data += part
    return data


def test_non_ascii_garbage_never_kills_the_next_clients_connection():
    with VirtualChip("sim://") as chip:
        host, port = chip.address.split(":")
        with socket.create_connection((host, int(port))) as a:
            a.sendall(b"\xff\xfe\xc3\xa9 garbage \xe2\x98\x83\n\x80\x81:PULS 1\n")
            a.sendall(b"*IDN?\n")
            recv_line(a)  # processed in order
        with socket.create_connection((host, int(port))) as b:
            for _ in range(3):
                b.sendall(b"SYST:ERR?\n")
                line = recv_line(b)
                line.decode("ascii")  # raises if not ASCII
                assert line.startswith((b"-100,", b"0,"))
            b.sendall(b"*IDN?\n")
            assert recv_line(b).startswith(b"analog-hil,virtual-chip")
        assert all(all(" " <= ch <= "~" for ch in msg) for _, msg in chip.firmware.errors)


def test_mvm_batches_beyond_max_batch_are_split_by_the_host():
    be, fw = loopback_backend("sim://?io=ideal&seed=2")
    try:
        tile = be.allocate("t", 3, 5)
        x = torch.randn(MAX_BATCH + 3, 5)
        y = tile.mvm(x)
        w = fw.backend.tile("t").read()
        assert y.shape == (MAX_BATCH + 3, 3)
        assert torch.allclose(y, x @ w.t(), atol=1e-4)
        assert tile.mvm(torch.zeros(0, 5)).shape == (0, 3)
    finally:
        be.close()
        fw.backend.close()


def test_train_with_an_absurd_learning_rate_over_visa_stops_within_the_budget(tmp_path,
                                                                           capsys):
    """Today's failure: lr 1e30 (or a NaN loss) became int32 -2^31 counts split into
    millions of 1,024-pulse commands; now the first step is refused and the run stops."""
    for lr, why in ((1e30, "beyond any pulse command"), (50.0, "max_pulses_per_step=4096")):
        with VirtualChip("sim://?seed=1") as chip:
            fw = chip.firmware
            fw.count_log = []
            cfg = {"name": "runaway", "seed": 0, "backend": chip.url,
                   "model": {"hidden": [3], "activation": "tanh"},
                   "data": {"name": "digits", "limit_train": 20, "limit_test": 10},
                   "algorithm": {"name": "analog_sgd", "lr": lr, "update": "pulse"},
                   "train": {"epochs": 1, "batch_size": 10}}
            path = tmp_path / f"run{lr}.yaml"
            path.write_text(yaml.safe_dump(cfg))
            start = len(fw.count_log)
            with pytest.raises(SystemExit) as exc:
                main(["train", str(path), "--out", str(tmp_path / f"out{lr}"), "--quiet"])
            assert exc.value.code == 2
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and why in err, err
            budget = load_profile("virtual").limits
            applied = [c for kind, _, c in fw.count_log[start:] if kind == "PULSE"]
            assert applied and max(int(c.max()) for c in applied) <= \
                budget.max_pulses_per_command
            assert len(applied) < 1000  # the programming rounds, then nothing
            assert fw.log[-1].startswith("OUTP OFF")  # outputs off from the host
            assert not fw.outputs


def test_refused_step_changes_nothing_on_the_chip():
    be, fw = loopback_backend("sim://?seed=4")
    try:
        from hil.algorithms import AnalogSGD
        alg = AnalogSGD(be, (2, 2), lr=1.0)
        before = fw.backend.tile("layer.W").read().clone()
        for bad in (float("nan"), 1e30, 1e5):
            with pytest.raises(SafetyLimitError):  # NonFiniteError is one
                alg.step(torch.full((2, 2), bad))
        assert torch.equal(fw.backend.tile("layer.W").read(), before)
        assert fw.device_pulses == 0 and np.isfinite(before.numpy()).all()
    finally:
        be.close()
        fw.backend.close()


def test_serial_frames_larger_than_the_chip_takes_are_never_buffered():
    from drivers.chip_handlers import FrameHandler
    from drivers.frames import REQ_HEAD, REQ_SYNC

    inner = open_backend("sim://")
    fw = ChipFirmware(inner, load_profile("mcu-board"))
    sess = Session(FrameHandler(fw), None)
    try:
        head = REQ_HEAD.pack(REQ_SYNC, 0x20, 1, fw.max_block + 4096)
        sess.feed(head)
        for _ in range(8):
            sess.feed(b"\x00" * (1 << 20))
            assert len(sess.buf) < REQ_HEAD.size + 1
        assert fw.max_block < 8 << 20 and fw.device_pulses == 0
    finally:
        inner.close()
