"""Example service: reads a series' DICOM through dcm_processor_service and stores a summary."""

import numpy as np
from dcm_processor_service import get_series_dicom, set_session_data


def summarise(session_id, job_name, headers, params, added_params, **kwargs):
    datasets = get_series_dicom(str(headers["_id"]))
    pixels = np.stack([dataset.pixel_array for dataset in datasets]).astype(np.float32)
    summary = {
        "instances": len(datasets),
        "modality": str(datasets[0].Modality),
        "shape": list(pixels.shape),
        "mean_intensity": round(float(pixels.mean()), 2),
    }
    print(f"summarised {summary['instances']} instances of shape {summary['shape'][1:]}", flush=True)
    set_session_data("summary", summary)
    return summary
