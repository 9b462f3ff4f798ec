"""ArC TWO facts shared by the driver, its interlock and the simulated instrument: the
channel layout libarc2 assumes for a 32x32 array, the instrument's ratings and the timings
of its command sequences (libarc2 0.6.0 source and the ArC TWO protocol notes)."""

from __future__ import annotations

CHANNELS = 64
# libarc2's array layout: wordline channels 16..31, 48..63, bitline channels 0..15, 32..47,
# each in this (ascending) order in every slice result and in read_all's rows and columns
WORD_CHANNELS: tuple[int, ...] = (*range(16, 32), *range(48, 64))
BIT_CHANNELS: tuple[int, ...] = (*range(0, 16), *range(32, 48))

# ratings (what the station may ever ask of the instrument)
MAX_AMPLITUDE_V = 13.5  # pulse or read voltage across a device
MIN_WIDTH_NS = 40  # shortest high-speed pulse
WIDTH_STEP_NS = 10  # high-speed driver timing resolution
MAX_FAST_WIDTH_NS = 500_000_000  # longer pulses leave the high-speed drivers (libarc2)
MAX_CHANNEL_CURRENT_A = 10e-3  # per channel

# instrument clock: what each part of a command sequence takes
USB_WRITE_NS = 2_500_000  # libarc2 waits 2.5 ms after every write of the command buffer
USB_READ_NS = 250_000  # one result block (64 words) read back over USB 2.0 (assumed)
INSTRUCTION_NS = 320  # one 9-word instruction in the FPGA FIFO (the shortest delay)
DAC_SETTLE_NS = 30_000  # libarc2's settling delay after loading the DACs of a pulse or read
ADC_NS = 10_000  # one conversion of all selected channels (no averaging)
READ_HOLD_NS = 1_000  # libarc2's delay after a current read
GROUND_SETTLE_NS = 100_000  # grounding after an open read (read_slice_open)
PULSE_INSTRUCTIONS = 9  # HS preload, pulse, channel update, DACs, HS timing, pulse, ...
READ_INSTRUCTIONS = 8  # DAC reset, channel update, DACs, update, read, AMP PRP, ground


def pulse_ns(nanos: int) -> int:
    """Modelled FIFO time of one high-speed pulse command (one pulse_* call)."""
    return PULSE_INSTRUCTIONS * INSTRUCTION_NS + DAC_SETTLE_NS + int(nanos)


def read_ns() -> int:
    """Modelled FIFO time of one slice read (the conversion and its settling)."""
    return READ_INSTRUCTIONS * INSTRUCTION_NS + DAC_SETTLE_NS + ADC_NS + READ_HOLD_NS
