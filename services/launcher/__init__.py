"""The Launcher: accepts launch requests, stores them durably, and creates worker pods.

- podspec.py    pure: parse templates/overrides, build the pod (template -> generated -> override)
- templates.py  the named pod templates the launcher is configured with
- store.py      SQLite: accepted launches and the launch-event log (replayed on start)
- creator.py    Kubernetes adapter use: bounded concurrent creates with retry and backoff
- server.py     thin gRPC layer
"""
