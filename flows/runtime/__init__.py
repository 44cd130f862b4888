"""Plain Python used by the flows' tasks: records, archives, callbacks, child processes, worker types.

Nothing in this package uses Prefect decorators, so every piece can be tested on its own.
"""
