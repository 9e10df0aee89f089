"""Ray job entrypoints: `python -m jobs.<name> ...`. Thin: parse arguments, call `flowops`."""
