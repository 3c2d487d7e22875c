"""The Reconciler: the single owner of task state.

- statemachine.py  pure: (task, pod event) -> decision: new state, failure details, pod action
- store.py         SQLite: tasks, the transition log, stream cursors and pod actions, committed together
- engine.py        consumes launcher and watcher streams, applies decisions in batches
- actions.py       Kubernetes adapter use: exactly one delete (or done-label patch) per pod
- server.py        thin gRPC layer: WatchTaskStates, GetTask, ListTasks, CancelTask...
"""
