"""Simulated station instruments: the B2900 SMU and B2200A matrix behind a real SCPI parser,
the 2600B SMU and 707B matrix behind a real Lua runtime (TSP is Lua), all acting on one
simulated chip (:mod:`drivers.station.sim.chip`) driven by any hil backend URL."""
