"""Ray Serve applications (`serve run serve_apps.<name>:app`). Thin: build from `flowops`."""
