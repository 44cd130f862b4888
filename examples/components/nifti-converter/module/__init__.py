"""Example venv service: converts a series to NIfTI with dcm2niix and stores the file as a session file.

`get_series_nifti` (dcm_processor_service) downloads the series' instances and runs dcm2niix on them;
`upload_session_file` stores the result in the platform's GridFS, where later jobs of the session
read it with `download_session_file("nifti", job_name="to-nifti")`.
"""

import json
import os
import tempfile

from dcm_processor_service import get_series_nifti, upload_session_file


def to_nifti(session_id, job_name, headers, params, added_params, **kwargs):
    with tempfile.TemporaryDirectory() as folder:
        nifti_file = os.path.join(folder, "series.nii.gz")
        _, sidecar_file, _ = get_series_nifti(str(headers["_id"]), filename=nifti_file)
        with open(sidecar_file) as sidecar:
            sidecar_json = json.load(sidecar)
        size = os.path.getsize(nifti_file)
        upload_session_file(nifti_file, "nifti", content_type="application/gzip", ext=".nii.gz")
    print(f"converted the series to a {size} byte NIfTI file", flush=True)
    return {"file": "nifti", "bytes": size, "slices": sidecar_json.get("Slices")}
