"""`python -m services.launcher [--flags]`: run the Launcher."""

import sys

from services.launcher.server import main

main(sys.argv[1:])
