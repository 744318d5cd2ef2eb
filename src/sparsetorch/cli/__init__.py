"""The ``sparsetorch`` command: one module per subcommand (``sparsetorch --help``)."""
