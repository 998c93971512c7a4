"""Reference implementations, the yardsticks of the tests and the benchmarks (``reference.evaluation``:
the published evaluation code as published, and exact loop versions of it).

It sits above ``tools`` and below ``tests`` and ``bench`` in the order of the rooms, so nothing of the
product imports it, and the benchmarks need nothing from ``tests/``.
"""
