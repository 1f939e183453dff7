"""One module per `dptrain` subcommand; see `dptrain.cli`."""
