"""The ArC TWO crossbar platform: the ``arc2://`` driver over pyarc2 (backend), its
simulated instrument with pyarc2's API (sim), channel mappings, ratings and timings."""
