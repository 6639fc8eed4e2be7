"""Command-line tools: the `dsi` command, `dsi up`, and the experiments (simulate, bench)."""
