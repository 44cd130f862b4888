"""Example docker service: checks that a series is a regular volume and stores the verdict as session data.

It runs in a container of the worker's image (see ../worker/Dockerfile), as a non-root user with no
capabilities; the `qc_tool` it imports was installed into the image by the Dockerfile.
"""

from dcm_processor_service import get_series_dicom, set_session_data
from qc_tool import geometry_report


def check_geometry(session_id, job_name, headers, params, added_params, **kwargs):
    datasets = get_series_dicom(str(headers["_id"]))
    report = geometry_report(datasets, float(params.get("max_spacing_deviation_mm", 0.01)))
    print(f"checked {report['instances']} instances: {'regular' if report['regular'] else 'irregular'}", flush=True)
    set_session_data("geometry", report)
    return report
