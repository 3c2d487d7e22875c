"""The Watcher: lists and watches this executor's worker pods and streams every change over gRPC.
Raw pods become PodEvents in shepherd/podevents.py (pure, shared with the reconciler).

- informer.py  Kubernetes adapter loop: list, watch from the list's resourceVersion with bookmarks,
               re-list and diff after 410 Gone, restart a silent stream
- server.py    thin gRPC layer: WatchPodEvents with cursors and snapshots
"""
