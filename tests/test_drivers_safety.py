"""Station interlock: profile validation, limits checked before any byte is sent, and a
property test that no sequence of user calls gets a command outside the limits onto the wire."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drivers.chip_backend import ChipBackend
from drivers.chip_handlers import ScpiHandler, Session
from drivers.firmware import ChipFirmware
from drivers.profile import load_profile
from drivers.scpi import ScpiLink
from drivers.transport import LoopbackTransport
from hil.backend import open_backend
from hil.errors import BackendError, ConfigError, SafetyLimitError

STRICT = {
    "name": "strict",
    "chip": {"idn_contains": "virtual-chip", "pulse_dtype": "int8"},
    "pulses": {"potentiate": {"amplitude_v": 1.0, "width_s": 1e-6, "compliance_a": 1e-4},
               "depress": {"amplitude_v": -1.0, "width_s": 1e-6, "compliance_a": 1e-4}},
    "arrays": [{"rows": 32, "cols": 32}, {"rows": 16, "cols": 16}],
    "limits": {"max_amplitude_v": 1.5, "max_width_s": 2e-6, "max_compliance_a": 2e-4,
               "max_pulses_per_command": 5, "allowed_rows": [4, 27], "allowed_cols": [2, 19]},
}


@pytest.fixture(scope="module")
def strict_profile(tmp_path_factory):
    path = tmp_path_factory.mktemp("profiles") / "strict.yaml"
    path.write_text(yaml.safe_dump(STRICT))
    return str(path)


def test_shipped_profiles_validate():
    for name in ("virtual", "mcu-board"):
        assert load_profile(name).name == name


@pytest.mark.parametrize("edit, field", [
    (lambda d: d["limits"].update(max_pulses_per_command=500), "<top>"),  # int8 cannot hold it
    (lambda d: d["limits"].update(allowed_rows=[5, 2]), "limits"),
    (lambda d: d["pulses"]["potentiate"].update(width_s=-1), "pulses.potentiate.width_s"),
    (lambda d: d.update(colour="red"), "colour"),
    (lambda d: d["limits"].pop("max_width_s"), "limits.max_width_s"),
])
def test_bad_profile_is_one_clear_line(tmp_path, edit, field):
    data = yaml.safe_load(yaml.safe_dump(STRICT))
    edit(data)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as exc:
        load_profile(str(path))
    assert exc.value.path == str(path) and exc.value.field == field
    assert "\n" not in str(exc.value)


def test_missing_profile_names_the_file():
    with pytest.raises(ConfigError, match="no-such-station.yaml: profile"):
        load_profile("no-such-station")


class Recorder:
    """A loopback transport to an in-process virtual chip that keeps every byte sent."""

    def __init__(self, profile_path: str):
        self.sent: list[bytes] = []
        self.inner = open_backend("sim://")
        self.fw = ChipFirmware(self.inner, load_profile(profile_path))
        session = Session(ScpiHandler(self.fw), None)

        def serve(data: bytes) -> bytes:
            self.sent.append(data)
            return b"".join(session.feed(data)[0])

        self.transport = LoopbackTransport(serve)


def commands(sent: list[bytes]) -> list[tuple[str, bytes | None]]:
    """Parse everything that went onto the wire with the chip's own parser."""
    handler, buf, out = ScpiHandler(None), bytearray(b"".join(sent)), []
    while True:
        req, used = handler.parse(buf)
        if req is None:
            assert used == 0 and not buf, f"unparsed bytes on the wire: {bytes(buf[:40])!r}"
            return out
        del buf[:used]
        out.append(req)


def assert_within_limits(sent: list[bytes], profile) -> None:
    lim = profile.limits
    (r0, r1), (c0, c1) = lim.allowed_rows, lim.allowed_cols
    places: dict[str, tuple[int, int, int, int]] = {}
    for text, block in commands(sent):
        verb, _, args = text.partition(" ")
        if verb in ("PULS:POT", "PULS:DEP"):
            amp, width, comp = (float(v) for v in args.split(","))
            assert abs(amp) <= lim.max_amplitude_v
            assert 0 < width <= lim.max_width_s and 0 < comp <= lim.max_compliance_a
        elif verb == "TILE:ALLOC?":
            _, name, array, row, col, rows, cols = args.split(",")
            row, col, rows, cols = int(row), int(col), int(rows), int(cols)
            assert r0 <= row and row + rows - 1 <= r1 and c0 <= col and col + cols - 1 <= c1
            spec = profile.arrays[int(array)]
            assert row + rows <= spec.rows and col + cols <= spec.cols
            places[name] = (row, col, rows, cols)
        elif verb == "TILE:OUTER?":  # pulse trains of 31 slots never fit 5 per command
            raise AssertionError("a rank-1 update beyond the pulse limit was sent")
        elif verb == "TILE:PULS?":
            name = args.split(",")[1]
            row, col, rows, cols = places[name]
            counts = np.frombuffer(block, "<i1").reshape(rows, cols)
            assert np.abs(counts.astype(int)).max() <= lim.max_pulses_per_command


calls = st.lists(st.one_of(
    st.tuples(st.just("alloc"), st.integers(0, 3), st.integers(1, 40), st.integers(1, 40)),
    st.tuples(st.just("pulse"), st.integers(0, 3), st.integers(0, 2**16), st.integers(0, 9)),
    st.tuples(st.just("shape"), st.sampled_from(["potentiate", "depress", "sideways"]),
              st.floats(-3, 3), st.floats(-1e-6, 4e-6), st.floats(-1e-4, 4e-4)),
    st.tuples(st.just("read"), st.integers(0, 3)),
    st.tuples(st.just("outer"), st.integers(0, 3), st.integers(1, 4)),
), max_size=12)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(calls=calls)
def test_no_call_sequence_sends_a_command_outside_the_limits(strict_profile, calls):
    rec = Recorder(strict_profile)
    profile = load_profile(strict_profile)
    be = ChipBackend("loopback://", ScpiLink(rec.transport), profile, retries=0)
    names = ["a", "b", "c", "d"]
    try:
        for call in calls:
            before = len(rec.sent)
            try:
                if call[0] == "alloc":
                    be.allocate(names[call[1]], call[2], call[3])
                elif call[0] == "pulse" and names[call[1]] in be.tiles():
                    tile = be.tile(names[call[1]])
                    rng = np.random.default_rng(call[2])
                    n = rng.integers(-call[3], call[3] + 1, size=tile.shape)
                    tile.pulse(torch.from_numpy(n.astype(np.int32)))
                elif call[0] == "shape":
                    be.set_pulse_shape(*call[1:])
                elif call[0] == "read" and names[call[1]] in be.tiles():
                    be.tile(names[call[1]]).read()
                elif call[0] == "outer" and names[call[1]] in be.tiles():
                    rows, cols = be.tile(names[call[1]]).shape
                    be.tile(names[call[1]]).outer_update(torch.ones(call[2], cols),
                                                         torch.ones(call[2], rows), 0.1)
            except SafetyLimitError:
                assert len(rec.sent) == before, "a refused call sent bytes"
            except BackendError:
                pass
    finally:
        be.close()
        rec.inner.close()
    assert_within_limits(rec.sent, profile)
    assert not rec.fw.outputs


def test_pulses_outside_allowed_region_of_an_existing_tile_are_refused(strict_profile):
    """A tile left on the chip (TILE:LIST?) that reaches outside the allowed rows."""
    rec = Recorder(strict_profile)
    rec.fw.alloc("old,0,0,0,8,8")  # rows 0..7, but only 4..27 are allowed
    be = ChipBackend("loopback://", ScpiLink(rec.transport), load_profile(strict_profile))
    tile = be.tile("old")
    inside = torch.zeros(8, 8, dtype=torch.int32)
    inside[5, 3] = 1
    tile.pulse(inside)
    before = len(rec.sent)
    outside = torch.zeros(8, 8, dtype=torch.int32)
    outside[1, 3] = 1
    with pytest.raises(SafetyLimitError, match="allowed"):
        tile.pulse(outside)
    assert len(rec.sent) == before
    be.close()
    rec.inner.close()
