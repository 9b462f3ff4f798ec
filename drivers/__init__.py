"""Real-instrument backends: SCPI over pyvisa (visa://), framed serial over pyserial
(serial://), station safety limits, and the virtual chip that serves the emulator."""
