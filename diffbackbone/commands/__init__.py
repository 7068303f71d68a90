"""The `diffbackbone` subcommands that have no module of their own elsewhere: `features`, `export`, `taps`.

`cli.py` imports each one only when its subcommand runs (`--help` stays fast)."""
