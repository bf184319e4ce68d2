"""Brain-aligned models: feature extraction, encoding models, candidate pools and selection objectives.

Everything here is pure computation on arrays and models passed in. Nothing opens a socket or reads
a clock, so the same code serves a live session, a replay and the in-process benchmarks.
"""
