"""`python -m hapo_cli` = the `hapo` command."""

from .cli import main

main()
