"""Demonstrations run by ``iama demo <name>``; each module has add_arguments(parser) and run(args)."""
