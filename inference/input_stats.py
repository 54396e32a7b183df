"""PHI-free intensity statistics of the model input, for drift monitoring (docs/model.md).

Computed on the tensor the network receives — after decoding, VOI windowing, MONOCHROME2 and the
squash to the manifest's size, i.e. values in [0, 1] before the normalisation inside the graph —
so they describe what the *model* sees, whatever the modality, encoding or window did on the way.
A few numbers per image, cheap (one pass over 224 x 224 floats) and meaningless without the image:
nothing in them identifies a patient.

What each one catches: ``mean`` a brighter/darker rendering (another window, an inverted
MONOCHROME1 mistake), ``std`` a flatter or harder contrast, ``dark_fraction``/``bright_fraction``
clipping and borders (collimation, burned-in frames, saturation).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

#: The statistics, in the order they are reported; ``probability`` is monitored beside them.
INPUT_FEATURES: tuple[str, ...] = ("mean", "std", "dark_fraction", "bright_fraction")
#: A pixel counts as dark below / bright above these values of the [0, 1] input.
DARK_BELOW = 0.02
BRIGHT_ABOVE = 0.98
#: Decimals kept in the stored statistics (far below what drift can resolve).
DECIMALS = 5


def input_statistics(tensor: npt.NDArray[np.floating]) -> dict[str, float]:
    """The :data:`INPUT_FEATURES` of one model input (values in [0, 1]), rounded.

    Raises ``ValueError`` for an empty tensor (there is no such model input).
    """
    x = np.asarray(tensor, dtype=np.float64)
    if x.size == 0:
        raise ValueError("tensor: empty, no statistics")
    values = {
        "mean": float(x.mean()),
        "std": float(x.std()),
        "dark_fraction": float(np.count_nonzero(x < DARK_BELOW)) / x.size,
        "bright_fraction": float(np.count_nonzero(x > BRIGHT_ABOVE)) / x.size,
    }
    return {name: round(values[name], DECIMALS) for name in INPUT_FEATURES}
