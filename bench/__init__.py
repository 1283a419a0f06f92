"""coldbrew's benchmark suite: `python -m bench [--quick]` from the repository root.

Kept free of imports so that the comparator scripts under `bench.comparators`, which
run as `python -m bench.comparators.NAME`, start as small processes.
"""
