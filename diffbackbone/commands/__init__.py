"""Handlers of the `diffbackbone` subcommands (parsed in `diffbackbone.cli`)."""
