"""Instrument stations: a source-measure unit routed to one crossbar device at a time by a
switch matrix (Keysight B2900 + B2200A/E5250A over SCPI, Keithley 2600B + 707B/708B over TSP).

- :mod:`drivers.station.profile`: the station profile YAML (resources, wiring, pulses, limits);
- :mod:`drivers.station.backend`: ``station://PROFILE``, the backend on the one contract;
- :mod:`drivers.station.keysight`, :mod:`drivers.station.keithley`: the two dialects;
- :mod:`drivers.station.sim`: simulated instruments that speak the real command sets.
"""
