"""Prefect block types of dcm-processor-flows.

`prefect block register -m blocks` registers every block type defined here.
"""

from blocks.database import DcmDatabase
from blocks.host import WorkerHost

__all__ = ["DcmDatabase", "WorkerHost"]
