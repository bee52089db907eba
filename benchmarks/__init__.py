"""Measurement scripts and the benchmark harness (speed, memory, parity margins); not imported by the model."""
