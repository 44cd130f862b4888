"""What the image adds: a small geometry check (stands in for the model or tool a real image carries)."""

import itertools
import math


def _position(dataset) -> list[float]:
    return [float(value) for value in dataset.ImagePositionPatient]


def geometry_report(datasets, max_spacing_deviation_mm: float) -> dict:
    """Sort the slices along their normal; report the spacing and whether it is regular."""
    orientation = [float(value) for value in datasets[0].ImageOrientationPatient]
    row, column = orientation[:3], orientation[3:]
    normal = [row[1] * column[2] - row[2] * column[1], row[2] * column[0] - row[0] * column[2],
              row[0] * column[1] - row[1] * column[0]]
    distances = sorted(sum(p * n for p, n in zip(_position(dataset), normal, strict=True)) for dataset in datasets)
    gaps = [later - earlier for earlier, later in itertools.pairwise(distances)]
    spacing = sum(gaps) / len(gaps) if gaps else 0.0
    regular = bool(gaps) and all(math.isclose(gap, spacing, abs_tol=max_spacing_deviation_mm) for gap in gaps)
    return {"instances": len(datasets), "slice_spacing_mm": round(spacing, 4), "regular": regular,
            "rows": int(datasets[0].Rows), "columns": int(datasets[0].Columns)}
