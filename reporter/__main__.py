"""`python -m gua_report` runs the gua-report CLI."""

from .cli import main

main()
