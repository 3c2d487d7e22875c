"""Benchmarks of the whole suite on the local control plane, reported as ratios against baselines
measured in the same run (never as timing assertions in tests)."""
