"""`python -m pipeline` is the `gsp` command."""

from pipeline.cli import main

main()
