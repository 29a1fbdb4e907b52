"""The ``ckptmerge`` command line: one module per subcommand, each body one library call.

May import every room below it; nothing imports ``cli``.
"""
