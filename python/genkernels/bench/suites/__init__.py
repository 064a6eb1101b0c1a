"""Benchmark suites: every module here is imported by ``registry.load_suites()`` and registers
its cases with ``registry.register``. See ``genkernels.bench`` for how to add one."""
