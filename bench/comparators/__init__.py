"""Programs that the benchmarks compare coldbrew with, each run as its own subprocess."""
