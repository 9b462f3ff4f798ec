"""Where pyarc2 imports, the simulated ArC TWO has exactly its Instrument's public methods,
with the same parameters (names, kinds, defaults), and the same enumerations, so code
written against one runs on the other."""

from __future__ import annotations

import inspect

import pytest

from drivers.arc2 import sim

pyarc2 = pytest.importorskip("pyarc2")

ENUMS = ("BiasOrder", "ControlMode", "DataMode", "ReadType", "ReadAt", "ReadAfter",
         "AuxDACFn", "IODir", "LogicLevel", "OutputRange", "WaitFor")


def public(cls: type) -> list[str]:
    return sorted(n for n in dir(cls) if not n.startswith("_") and callable(getattr(cls, n)))


def params(fn) -> list[tuple[str, object, object]]:
    """(name, kind, default) per parameter; for extension methods from __text_signature__."""
    sig = inspect.signature(fn)
    return [(p.name, p.kind, p.default) for p in sig.parameters.values()]


def test_instrument_has_pyarc2s_methods_and_signatures():
    real, fake = pyarc2.Instrument, sim.Instrument
    assert public(fake) == public(real)
    for name in public(real):
        assert params(getattr(fake, name)) == params(getattr(real, name)), name
    # the constructor: pyarc2's (port, firmware, init=True), model settings keyword-only
    real_init = params(real.__init__)
    fake_init = params(fake.__init__)[:len(real_init)]
    assert fake_init == real_init
    assert all(p.kind is p.KEYWORD_ONLY
               for p in list(inspect.signature(fake.__init__).parameters.values())[len(real_init):])


def test_module_names_and_enumerations_match():
    for name in (*ENUMS, "Instrument", "ArC2Error", "IdleMode", "find_ids", "ArC2Config",
                 "LIBARC2_VERSION"):
        assert hasattr(sim, name), name
    assert sim.LIBARC2_VERSION == pyarc2.LIBARC2_VERSION
    for name in ENUMS:
        real, fake = getattr(pyarc2, name), getattr(sim, name)
        assert sorted(n for n in dir(fake) if not n.startswith("_")) == \
            sorted(n for n in dir(real) if not n.startswith("_")), name
    assert {m.name: m.value for m in sim.IdleMode} == {m.name: m.value for m in pyarc2.IdleMode}
    assert sim.ReadAt.Arb(0.5).voltage() == pyarc2.ReadAt.Arb(0.5).voltage()
    assert str(sim.ReadAfter.from_str("block")) == str(pyarc2.ReadAfter.from_str("block"))
    assert issubclass(sim.ArC2Error, Exception)
