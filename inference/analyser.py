"""The classifier behind the result job's :class:`~storage.results.Analyser` port.

Maps what :mod:`inference.pipeline` concludes onto :class:`~storage.results.ImageVerdict`:
an inapplicable image is ``not-applicable`` with the rule that excluded it, an image whose
pixels cannot be used is ``failed`` with the reason — verdicts, never exceptions, so that the
EHR is told "not analysed, because ..." instead of nothing.
"""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset

from inference.applicability import ApplicabilityRules, SiteRules, resolve_rules
from inference.engine import InferenceEngine
from inference.errors import PreprocessingError
from inference.pipeline import classify_dataset
from inference.preprocess import DEFAULT_DISPLAY_MAX_SIDE, display_image
from storage.models import ResultStatus
from storage.results import Analysis, DisplayImage, ImageVerdict, ModelIdentity


class ClassifierAnalyser:
    """One loaded model package (engine) and its applicability rules (the model's intended use with
    the site's overrides, :func:`inference.applicability.resolve_rules`)."""

    def __init__(
        self,
        engine: InferenceEngine,
        rules: ApplicabilityRules | SiteRules | None = None,
        *,
        display_max_side: int = DEFAULT_DISPLAY_MAX_SIDE,
    ) -> None:
        self._engine = engine
        # Resolved once against the loaded model's intended use (an invalid combination fails at start).
        self._rules = resolve_rules(rules, engine.manifest.intended)
        self._display_max_side = display_max_side
        manifest = engine.manifest
        self._model = ModelIdentity(
            model_id=manifest.id,
            name=manifest.name,
            version=manifest.version,
            manufacturer=manifest.manufacturer,
            device_uid=manifest.device_uid,
            intended_use=manifest.intended_use,
            threshold=float(manifest.threshold),
        )

    @property
    def model(self) -> ModelIdentity:
        return self._model

    def analyse(self, source: Dataset, *, with_display: bool) -> Analysis:
        try:
            outcome = classify_dataset(
                source, self._engine, self._rules, display_max_side=self._display_max_side if with_display else None
            )
        except PreprocessingError as exc:
            return Analysis(ImageVerdict(ResultStatus.FAILED, reason=str(exc)[:1000]))
        prediction = outcome.prediction
        if not outcome.applicable or prediction is None:
            return Analysis(ImageVerdict(ResultStatus.NOT_APPLICABLE, reason=outcome.reason))
        verdict = ImageVerdict(
            ResultStatus.OK,
            probability=float(prediction.probability),
            label=prediction.label,
            threshold=float(prediction.threshold),
            cam=np.asarray(prediction.cam, dtype=float).round(5).tolist(),
            timings_ms={k: round(float(v), 3) for k, v in outcome.timings_ms.items()},
            input_stats=None if outcome.input_stats is None else dict(outcome.input_stats),
        )
        return Analysis(verdict, outcome.display)

    def display(self, source: Dataset) -> DisplayImage:
        return display_image(source, self._engine.manifest.preprocessing, self._display_max_side)
