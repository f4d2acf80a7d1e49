"""Subcommands of ``xmllm``: every module here defines ``add_parser(subparsers)``.

Modules are discovered, not listed, so adding a command is adding a file. Each module's
``add_parser`` must register a parser whose default ``func`` takes the parsed arguments
and returns an exit code. Heavy imports (torch, transformers) belong inside ``func``,
so that ``xmllm --help`` stays fast.
"""
