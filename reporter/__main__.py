"""`python -m gua_report` runs the gua-report CLI."""

from gua_report.cli import main

main()
