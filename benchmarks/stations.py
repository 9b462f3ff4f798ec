"""Instrument time of SMU + switch-matrix stations: the ordered, batched station driver
against a naive one (one route and one pulse command per pulse, one route per read), on the
simulated instruments' modelled clock (the manuals' timings, drivers/station/timing.py).

Rows: one per station family (``FAMILIES``; another family adds its own entry). Prints
modelled seconds, program messages and relay operations per device-pulse, and the ratio.

    .venv/bin/python benchmarks/stations.py [--pulses 10]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

# benchmarks/calibration.py would shadow the calibration package: the repository root first
sys.path[:] = [str(Path(__file__).resolve().parents[1])] + [
    p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import yaml  # noqa: E402

from calibration.measfile import MeasurementWriter  # noqa: E402
from calibration.protocols import SweepProtocol, characterize, estimate_seconds  # noqa: E402
from drivers.profile import profile_path  # noqa: E402
from drivers.station.profile import station_profile  # noqa: E402
from drivers.station.url import connect, dialect_class  # noqa: E402


def _profile(name: str, rows: int, cols: int, cards: int, expansion: tuple[int, ...] = ()):
    """The shipped profile with one rows x cols array on outputs 1.., its matrix with
    ``cards`` cards and expansion frames of ``expansion`` cards each."""
    raw = yaml.safe_load(profile_path(name).read_text())
    raw["arrays"] = [{"rows": rows, "cols": cols, "row_lines": f"1-{rows}",
                      "col_lines": f"{rows + 1}-{rows + cols}"}]
    raw["matrix"]["cards"] = cards
    node = raw["matrix"].get("tsplink_node")  # frames on TSP-Link: the next node numbers
    raw["matrix"]["expansion"] = [{"resource": f"GPIB0::{30 + k}::INSTR",
                                   "idn_contains": raw["matrix"]["idn_contains"], "cards": n,
                                   **({"tsplink_node": node + 1 + k} if node else {})}
                                  for k, n in enumerate(expansion)]
    raw["limits"]["allowed_rows"] = [0, rows - 1]
    raw["limits"]["allowed_cols"] = [0, cols - 1]
    return station_profile(raw, name)


# (family, profile, array rows, cols, matrix cards, expansion frames' cards for a 32x32
# RLv2 layer): a B2200A holds 4 cards (48 outputs), so its characterization row uses a 24x24
# array; the 707B's 6 slots (72 outputs) take the 32x32 array. A 32x32 layer's W and P side
# by side need 32 + 64 = 96 lines: two B2200A frames of 4 cards, or a 707B and a second 707B
# with 2 cards.
FAMILIES = [("Keysight B2900 + B2200A", "keysight-b2900-b2200", 24, 24, 4, (4,)),
            ("Keithley 2600B + 707B", "keithley-2600b-707b", 32, 32, 6, (2,))]


def naive(cls):
    """The same dialect driven naively: every pulse and every read gets its own route (all
    relays opened, then row and column closed) and its own one-pulse command."""

    class Naive(cls):
        def _route(self, route, where):
            held = sorted({frame for frame, _, _ in self.relays(self.routed)}) or [0]
            self.routed = None
            for frame in held:  # every frame that holds a closed relay
                if self.profile.dialect == "keysight":
                    self._message(self.frames[frame], ":ROUT:OPEN:CARD ALL", "open")
                else:
                    self._message(self.frames[frame], 'channel.open("allslots")', "open")
            super()._route(route, where)

        def _pulses(self, route, count, at):
            for _ in range(abs(count)):
                self._route(route, at)
                self.exchange([(1 if count > 0 else -1, False)], at)

        def pulse_devices(self, trains, where):
            self.ensure_armed()  # as the ordered driver: pulses need the output on
            for (route, count), at in zip(trains, where, strict=True):
                self._pulses(route, count, at)

        def run_programs(self, programs, where):
            self.ensure_armed()
            out = []
            for (route, counts), at in zip(programs, where, strict=True):
                seq = []
                for n in counts:
                    self._pulses(route, n, at)
                    self._route(route, at)
                    seq += self.exchange([(0, True)], at)
                out.append(seq)
            self.idle()
            return out

    return Naive


def run(profile, driver: str, proto: SweepProtocol, tmp: str) -> dict[str, float]:
    be = connect(f"bench://{profile.name}", profile, "sim://?model=power&gamma=2&dw_min=0.01")
    if driver == "naive":
        be.dialect.__class__ = naive(dialect_class(profile))
    rows, cols = profile.arrays[0].rows, profile.arrays[0].cols
    station = be.chip.station
    try:
        start = be.chip.clock.seconds
        with MeasurementWriter(f"{tmp}/{driver}.h5", "bench", proto.as_dict()) as w:
            characterize(be, w, {"cal": (rows, cols)}, proto)
        seconds = be.chip.clock.seconds - start
        messages = be.dialect.messages
        relays = station.relay_operations
        device_pulses = be.chip.device_pulses
    finally:
        be.close()
    return {"seconds": seconds, "messages": messages, "relays": relays,
            "device_pulses": device_pulses}


def run_rlv2(profile, driver: str, shape: tuple[int, int]) -> dict[str, float]:
    """One RLv2 training step on a layer: the forward read of W, the gradient's pulse
    trains on P, the transfer's read of P's column and W's pulses."""
    import torch

    from hil.algorithms import ResidualLearningV2

    be = connect(f"bench://{profile.name}", profile, "sim://?model=power&gamma=2&dw_min=0.001")
    if driver == "naive":
        be.dialect.__class__ = naive(dialect_class(profile))
    try:
        alg = ResidualLearningV2(be, shape, lr=0.1, transfer_lr=0.3, prefix="fc")
        grad = 0.03 * torch.randn(shape, generator=torch.Generator().manual_seed(0))
        start, msgs, relays = be.chip.clock.seconds, be.dialect.messages, \
            be.chip.station.relay_operations
        pulses = be.chip.device_pulses
        with be.step():
            alg.weight()  # the forward pass reads W (digital MVM from read-out weights)
            alg.step(grad)
        return {"seconds": be.chip.clock.seconds - start,
                "messages": be.dialect.messages - msgs,
                "relays": be.chip.station.relay_operations - relays,
                "device_pulses": be.chip.device_pulses - pulses}
    finally:
        be.close()


def main() -> None:
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pulses", type=int, default=10, help="pulses per direction (1 cycle)")
    ap.add_argument("--smu-only", action="store_true",
                    help="only the SMU + switch-matrix stations (not the ArC TWO rows)")
    args = ap.parse_args()
    proto = SweepProtocol(pulses=args.pulses, cycles=1, sympoint_pairs=0, noise_reads=0)
    full = SweepProtocol()  # hil characterize's defaults: 400 pulses, 2 cycles, 200 pairs ...
    print(f"characterization sweep, {args.pulses} pulses up and down, read after each "
          "(modelled instrument time)")
    print(f"{'station':28s} {'array':>6s} {'driver':>8s} {'seconds':>10s} "
          f"{'msgs/dev-pulse':>15s} {'relay ops/dev-pulse':>20s}")
    with tempfile.TemporaryDirectory() as tmp:
        for family, name, rows, cols, cards, _ in FAMILIES:
            profile = _profile(name, rows, cols, cards)
            got = {d: run(copy.deepcopy(profile), d, proto, tmp) for d in ("ordered", "naive")}
            for driver, r in got.items():
                dp = max(1, r["device_pulses"])
                print(f"{family:28s} {rows}x{cols:<3d} {driver:>8s} {r['seconds']:10.1f} "
                      f"{r['messages'] / dp:15.2f} {r['relays'] / dp:20.2f}")
            ratio = got["naive"]["seconds"] / got["ordered"]["seconds"]
            print(f"{'':28s} naive / ordered instrument time: {ratio:.1f}x")
            be = connect("bench://", profile, "sim://")
            try:
                est = estimate_seconds(be.allocate("cal", rows, cols), full)
            finally:
                be.close()
            print(f"{'':28s} full `hil characterize` (defaults) estimate, ordered: "
                  f"{est / 3600:.2f} h")
        print("\none RLv2 step on a layer (W and P side by side: n row + 2n column lines; "
              "16x16 on one matrix frame, 32x32 on two)")
        for family, name, _, _, cards, expansion in FAMILIES:
            for n, frames in ((16, ()), (32, expansion)):
                profile = _profile(name, n, 2 * n, cards, frames)
                got = {d: run_rlv2(copy.deepcopy(profile), d, (n, n))
                       for d in ("ordered", "naive")}
                for driver, r in got.items():
                    dp = max(1, r["device_pulses"])
                    print(f"{family:28s} {f'{n}x{n}':>6s} {driver:>8s} {r['seconds']:10.2f} "
                          f"{r['messages'] / dp:15.2f} {r['relays'] / dp:20.2f}")
                ratio = got["naive"]["seconds"] / got["ordered"]["seconds"]
                print(f"{'':28s} naive / ordered instrument time: {ratio:.1f}x "
                      f"({got['ordered']['device_pulses']} device-pulses, "
                      f"{1 + len(frames)} matrix frame{'s' if frames else ''})")
    if not args.smu_only:
        sys.path.insert(0, str(Path(__file__).parent))
        import station_arc2  # benchmarks/station_arc2.py: the ArC TWO family's rows

        print("\nArC TWO (arc2://sim): grouped pulses vs one pulse_one per device-pulse")
        station_arc2.main()


if __name__ == "__main__":
    main()
