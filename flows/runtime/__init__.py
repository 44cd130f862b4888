"""Plain Python used by the flows' tasks: records and the database gateway, archives, callbacks, child processes,
environment types.

Nothing in this package uses Prefect decorators, so every piece can be tested on its own.
"""
