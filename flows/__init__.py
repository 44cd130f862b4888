"""dcm-processor-flows: the dcm-processor execution runtime on Prefect 3."""
