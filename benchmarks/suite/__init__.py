"""The pieces of ``benchmarks/run.py``: workload, measuring, servers, contenders, cases, report."""
