"""`python -m shepherd_cli` is the `shepherd` console script."""

from shepherd_cli.main import run

run()
