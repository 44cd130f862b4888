"""Jobs without a worker run in this runtime's own interpreter, as the platform's default worker did."""

from __future__ import annotations

import sys
from pathlib import Path

from flows.runtime.environments.base import Environment


class LocalEnvironment(Environment):
    """The runtime's own Python; it has `dcm-processor-service`, as every worker environment must."""

    record_types = (None,)

    def interpreter(self) -> Path:
        return Path(sys.executable)
