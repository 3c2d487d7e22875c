"""Seeded fault injection: does every task end exactly once, as its scenario says, under every fault?

`python -m chaos` (or `make chaos SEEDS=N`) starts a throw-away control plane of its own, runs the
three services against it, launches a few hundred tasks with mixed outcomes while killing,
pausing and starving the parts of the system at moments chosen by a seed, and then checks every
task against what the scheduler was told and what the API server's audit log recorded. A seed
replays its plan (the tasks, the faults, their order and parameters); the wall-clock moments are
as close as the machine allows. It imports nothing from tests/: it is its own witness.
"""
