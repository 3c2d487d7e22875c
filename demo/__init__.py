"""The main job: a scheduler client that drives the whole suite against the local cluster.

It starts the control plane and the three services (each under its own ServiceAccount), launches
a few hundred tasks with mixed outcomes, follows WatchTaskStates live, and ends with a summary:
counts per final state and launch->running / launch->final latency percentiles.
"""
