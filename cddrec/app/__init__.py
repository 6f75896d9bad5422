"""The application layer: the command-line entry points and the demo.

Nothing imports this package; it imports the core and the wings (export, runtime, benchmarks)
and only parses options and calls their library functions.
"""
