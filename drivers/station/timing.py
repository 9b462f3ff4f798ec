"""The instruments' timings the simulated station's clock and the drivers' time estimate use.
Each constant cites the manual section it comes from; the few a manual does not give are
marked ASSUMED with the reasoning."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StationTiming:
    """Seconds one step of an instrument takes (what the modelled clock adds up)."""

    relay_close_s: float  # a relay command's close settle time
    relay_open_s: float  # a relay command's open settle time
    min_pulse_width_s: float  # shortest pulse the SMU programs
    max_pulse_width_s: float
    min_period_s: float  # shortest trigger period of a pulse train
    min_aperture_s: float
    max_aperture_s: float
    measure_overhead_s: float  # settling + A/D conversion around the aperture of one reading
    message_s: float  # one program message over the bus: transfer, parse, reply turnaround
    max_train: int  # most pulses of one triggered train (the trigger count's range)


KEYSIGHT = StationTiming(
    # ASSUMED: the B2200A/E5250A guides' switching-time figure was not in the searched text
    # (searched again for this revision: only the sequence semantics, E5250A User's Guide
    # Ed. 9 Table 5-3: BBM waits for the opens, NSEQ does not); 5 ms is the order of reed/dry
    # relays in such matrices (the 707B manual's example: 4 ms a close).
    relay_close_s=5e-3,
    relay_open_s=5e-3,
    # B2900 User's Guide, Ed. 5, 6-7 "Pulse Output": pulse width 50 us to 100000 s;
    # Ed. 2, 2-20 "Pulse Source Supplemental Characteristics": minimum programmable 50 us.
    min_pulse_width_s=50e-6,
    max_pulse_width_s=1e5,
    # B2900 SCPI Command Reference, :TRIGger:TIMer: 1E-5 to 1E5 s.
    min_period_s=1e-5,
    # B2900 SCPI Command Reference, :SENSe:CURRent:APERture: 8E-6 to 2 s.
    min_aperture_s=8e-6,
    max_aperture_s=2.0,
    # ASSUMED: range settling and conversion around a short aperture (B2900 User's Guide,
    # "Measurement time" gives it per range; 100 us is the order for the uA-mA ranges).
    measure_overhead_s=100e-6,
    # ASSUMED: one GPIB/LAN message and its turnaround (not a manual figure).
    message_s=500e-6,
    max_train=100000,  # B2900 SCPI Command Reference, :TRIGger:COUNt: 1 to 100000
)

KEITHLEY = StationTiming(
    # 707B/708B Reference Manual 707B-901-01 Rev. B, Section 2 "Using sequential connect":
    # "each takes 4 ms to close"; Section 7 channel.connectrule: break-before-make takes the
    # open settle time plus the close settle time, channel.OFF the maximum of the two (the
    # driver's cold switching). Open settle ASSUMED equal to close (not in the searched text).
    relay_close_s=4e-3,
    relay_open_s=4e-3,
    # 2600B Reference Manual, "Pulse concepts"/datasheet pulse characteristics: minimum
    # programmable pulse width 100 us (ASSUMED from the datasheet; not in the searched text).
    min_pulse_width_s=100e-6,
    max_pulse_width_s=1e4,
    # 2600A/2600B Reference Manuals, trigger.timer[N].delay: default 10e-6 s, and a delay
    # list's intervals must average >= 50 us; the searched text gives no smaller delay, so the
    # minimum is ASSUMED to be that default.
    min_period_s=10e-6,
    # 2600B Reference Manual, smua.measure.nplc: 0.001 to 25 PLC (50 Hz: 20 us to 0.5 s).
    min_aperture_s=0.001 / 50,
    max_aperture_s=25 / 50,
    measure_overhead_s=100e-6,  # ASSUMED, as for the B2900
    message_s=500e-6,  # ASSUMED, as for the B2900
    max_train=268435455,  # 2600B Reference Manual, smua.trigger.count
)

TIMINGS = {"keysight": KEYSIGHT, "keithley": KEITHLEY}


def period_of(width_s: float, requested_s: float, timing: StationTiming) -> float:
    """The pulse-train period: the profile's, at least the width plus the shortest gap."""
    return max(requested_s, width_s + timing.min_period_s)
