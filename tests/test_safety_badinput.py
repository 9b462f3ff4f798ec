"""Bad input and interrupted measurements get one line and exit 2, never a traceback, and
leave nothing half-written or in the way of a rerun: existing measurements are replaced
only with --force and only by a complete one, a partial one is fitted only with
--allow-partial, --out under a file fails before any work, a busy port is one line, and
messages are printed as they are (never read as Rich markup)."""

from __future__ import annotations

import socket

import h5py
import yaml

from calibration.measfile import partial_path
from drivers.virtual_chip import VirtualChip
from hil.backend import open_backend
from hil.cli import main

URL = "sim://?model=power&gamma=0.5&dw_min=0.02&c2c=0.1&seed=1"
SMALL = ["--rows", "3", "--cols", "3", "--pulses", "30", "--cycles", "1",
         "--sympoint-pairs", "10", "--noise-reads", "3", "--quiet"]
CONFIG = {
    "name": "bad", "seed": 1, "backend": "sim://?seed=1",
    "model": {"hidden": [3]}, "algorithm": {"name": "rlv2", "lr": 0.1},
    "data": {"name": "least_squares", "n_inputs": 4, "n_outputs": 2, "limit_train": 20},
    "train": {"epochs": 1, "batch_size": 10},
}


def hil(args: list[str]) -> int:
    try:
        main(args)
    except SystemExit as exc:
        return exc.code or 0
    return 0


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


class Stop(KeyboardInterrupt):
    """Ctrl-C in the middle of the measurement (raised from the backend's pulse)."""


def test_characterize_never_overwrites_and_keeps_partial_data_apart(tmp_path, capsys,
                                                                    monkeypatch):
    out = tmp_path / "m.h5"
    assert hil(["characterize", "--backend", URL, "--out", str(out), *SMALL]) == 0
    before, inode = out.read_bytes(), out.stat().st_ino
    capsys.readouterr()
    assert hil(["characterize", "--backend", URL, "--out", str(out), *SMALL]) == 2
    assert "exists; pass --force" in one_line(capsys)
    assert out.read_bytes() == before
    # Ctrl-C during a --force run: the old measurement stays, the new blocks are apart
    with open_backend(URL) as be:
        EmulatedTile = type(be.allocate("probe", 1, 1))
    calls = {"n": 0}
    real = EmulatedTile._pulse

    def stopping(self, n):
        calls["n"] += 1
        if calls["n"] == 65:  # in the symmetric-point search, after the sweep
            raise Stop()
        real(self, n)

    monkeypatch.setattr(EmulatedTile, "_pulse", stopping)
    code = hil(["characterize", "--backend", URL, "--out", str(out), "--force", *SMALL])
    monkeypatch.setattr(EmulatedTile, "_pulse", real)
    assert code == 130
    err = one_line(capsys)
    assert err.startswith("interrupted by SIGINT: hil characterize stopped")
    assert f"{out} untouched" in err and "--allow-partial" in err
    assert out.read_bytes() == before
    part = partial_path(out)
    with h5py.File(part, "r") as f:
        assert not f.attrs["complete"]
    # a partial measurement is fitted only when asked, and says so
    calib = tmp_path / "c.h5"
    assert hil(["fit", str(part), "--out", str(calib)]) == 2
    assert "--allow-partial" in one_line(capsys) and not calib.exists()
    assert hil(["fit", str(part), "--out", str(calib), "--allow-partial", "--bins", "4"]) == 0
    assert "partial measurement" in capsys.readouterr().out and calib.exists()
    # the rerun is not blocked: --force replaces the old file once complete
    assert hil(["characterize", "--backend", URL, "--out", str(out), "--force", *SMALL]) == 0
    assert out.stat().st_ino != inode and not part.exists()  # renamed into place
    with h5py.File(out, "r") as f:
        assert f.attrs["complete"]


def test_out_under_a_file_is_one_line_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(CONFIG))
    meas = tmp_path / "m.h5"
    assert hil(["characterize", "--backend", URL, "--out", str(meas), *SMALL]) == 0
    assert hil(["fit", str(meas), "--out", str(tmp_path / "c.h5"), "--bins", "4"]) == 0
    capsys.readouterr()
    listing = sorted(p.name for p in tmp_path.iterdir())
    for args in (["train", str(cfg), "--quiet", "--out", str(blocker / "run")],
                 ["characterize", "--backend", URL, *SMALL, "--out", str(blocker / "m.h5")],
                 ["fit", str(meas), "--out", str(blocker / "sub" / "c.h5")],
                 ["report", str(tmp_path / "c.h5"), "--out", str(blocker / "rep")]):
        assert hil(args) == 2, args
        err = one_line(capsys)
        assert "is a file, not a directory" in err and str(blocker) in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == listing  # nothing written


def test_serve_virtual_chip_port_in_use_is_one_line(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        assert hil(["serve-virtual-chip", "--port", str(port), "--duration", "0"]) == 2
    err = one_line(capsys)
    assert f"127.0.0.1:{port}" in err and "--port" in err


def test_messages_are_never_read_as_markup(tmp_path, capsys):
    weird = tmp_path / "[/a]" / "m.h5"
    assert hil(["fit", str(weird), "--out", str(tmp_path / "c.h5")]) == 2
    assert "[/a]" in one_line(capsys)
    with VirtualChip("sim://?seed=1", "scpi", "tcp") as chip:
        assert hil(["characterize", "--backend", chip.url, "--out", str(tmp_path / "m.h5"),
                    "--tile", "no spaces", *SMALL]) == 2
    err = one_line(capsys)
    assert "[tile 'no spaces', allocate]" in err
