"""`python -m services.reconciler [--flags]`: run the Reconciler."""

import sys

from services.reconciler.server import main

main(sys.argv[1:])
