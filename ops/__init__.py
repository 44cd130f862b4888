"""The infrastructure around the flows: the embedded stack, the Prefect server wrapper, the warm engine, the
pool workers, Prefect's set-up for this project, and the `dcm-flows` command with its demo and progress view.

Imports run one way: ops -> flows -> flows.runtime -> blocks. Nothing in `flows/` imports from here.
"""
