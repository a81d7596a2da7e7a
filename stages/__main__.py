"""`python -m stages` is the `gsp` command (and `torchrun ... -m stages fit ...` runs it on many processes)."""

from stages.cli import main

main()
