"""The `flowops` command line: one Typer app, one module per stage (thin adapters)."""
