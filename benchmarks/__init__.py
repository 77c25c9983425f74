"""Benchmarks: an input generator (`benchmarks.generate`) and the runner that times the
pipeline phase by phase (`benchmarks.run`). See benchmarks/README.md."""
