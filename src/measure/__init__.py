"""Measuring speed and memory: what ``mode=benchmark``, its tests and the scripts in ``benchmarks/`` use.

* :mod:`~src.measure.timing`: seconds per call, peak memory, the device;
* :mod:`~src.measure.training_step`: seconds of the Lightning module's real training step;
* :mod:`~src.measure.original_structure`: the original's computation structure, measured against;
* :mod:`~src.measure.model_speed`: the benchmark of our model against that structure;
* :mod:`~src.measure.report`: the benchmark's report and its rows for ``BENCHMARKS.md``;
* :mod:`~src.measure.markdown`: adding a row to a table of a Markdown file;
* :mod:`~src.measure.images`: synthetic photographs for measuring image loading.
"""
