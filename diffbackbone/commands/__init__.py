"""One module per `diffbackbone` subcommand, each with `add_parser(subparsers)` and `run(args) -> int`: `features`,
`taps`, `inspect`, `export`, `match`, `depth`, `bench` and `eval` (its subcommands `spair`, `hpatches`, `davis`,
`pixel`); `clean-train` is `diffbackbone.train.cli`.

`cli.py` assembles them. A module's top level holds only its parser; `run` imports the library code it needs when the
subcommand runs (`--help` stays fast). Library code (models, data, evals, bench) never imports this package.
"""
