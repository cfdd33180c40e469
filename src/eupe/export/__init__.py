"""Shipping the student: ExecuTorch ``.pte`` export (XNNPACK, optional int8) and the latency gate.

``eupe export`` (:mod:`eupe.export.export`) and ``eupe latency`` (:mod:`eupe.export.latency`) are
the two pipeline steps; :mod:`eupe.export.lower` (with the graph rewrites of :mod:`eupe.export.rewrite`
that put every operator inside XNNPACK) and :mod:`eupe.export.runtime` are the pieces they (and
``benchmarks/export_latency.py``) are built from.
"""
