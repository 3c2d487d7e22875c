"""`python -m services.watcher [--flags]`: run the Watcher."""

import sys

from services.watcher.server import main

main(sys.argv[1:])
