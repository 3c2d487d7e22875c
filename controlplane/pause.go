// The real node's sandbox process. Every pod's sandbox runs one: it holds the pod's namespaces
// open, reaps orphans when the pod shares its PID namespace, and exits at once on SIGTERM or
// SIGINT. No registry is reachable here, so the local cluster builds its own instead of pulling
// registry.k8s.io/pause.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	signals := make(chan os.Signal, 8)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT, syscall.SIGCHLD)
	for sig := range signals {
		if sig != syscall.SIGCHLD {
			os.Exit(0)
		}
		// Several children may have ended for one SIGCHLD: reap until none is left.
		for {
			pid, err := syscall.Wait4(-1, nil, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}
