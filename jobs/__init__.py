"""Ray job entrypoints: `python -m jobs.<name> --config '<JSON>'` (or `--config @file.json`).

Thin: each parses its config with the pydantic model the client serialised
(`flowops.entrypoint.run_job`) and calls one `flowops` function.
"""
