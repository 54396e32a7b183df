"""The inference part's branch of the one exception tree (:mod:`conf.errors`).

Every failure the inference runtime can report is an :class:`InferenceError`, so a boundary (the
worker, the ``pneumo infer`` command) translates them with one table. The subclasses separate the
three things a caller must treat differently:

* the model package is unusable (:class:`ModelPackageError`, :class:`ModelIntegrityError`) — an
  operator problem, fail at start-up and never serve results from it;
* the image cannot be turned into a tensor (:class:`PreprocessingError` and subclasses) — a problem
  with one instance; the instance is kept and marked, the PACS never sees an error;
* the engine itself cannot run (:class:`EngineError`).

Messages never contain PHI: they name DICOM attributes and values of technical attributes only
(Transfer Syntax, Photometric Interpretation, …), never patient or study identifiers.
"""

from __future__ import annotations

from conf.errors import InvalidInputError, PneumoError, UnavailableError


class InferenceError(PneumoError):
    """Base class of every error raised by :mod:`inference`."""


class ModelPackageError(InferenceError, InvalidInputError):
    """The model directory or its ``model.json`` manifest is missing, unreadable or invalid."""


class ModelIntegrityError(ModelPackageError):
    """The ONNX file's SHA-256 differs from the manifest's ``onnx_sha256``; the model is refused."""


class EngineError(InferenceError, UnavailableError):
    """The inference engine cannot run a request (closed, bad input tensor, runtime failure)."""


class PreprocessingError(InferenceError, InvalidInputError):
    """A DICOM dataset cannot be turned into a model input tensor."""


class UnsupportedImageError(PreprocessingError):
    """The dataset is not a single-frame monochrome image (colour, multi-frame, not an image)."""


class MissingPixelDataError(PreprocessingError):
    """The dataset has no Pixel Data (7FE0,0010) element, or it is empty."""


class CorruptPixelDataError(PreprocessingError):
    """The Pixel Data could not be decoded (truncated, damaged, or an unsupported encoding)."""


class ApplicabilityConfigError(InferenceError, InvalidInputError):
    """The ``[inference]`` applicability overrides contradict the model's intended use (e.g. a
    ``min_age_years`` at or above the model's ``max_age_years``); refused at start-up."""
