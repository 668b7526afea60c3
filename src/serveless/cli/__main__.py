"""`python -m serveless.cli`."""

from serveless.cli import main

main()
