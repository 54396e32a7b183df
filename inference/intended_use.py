"""The model's declared intended use (``model.json`` → ``intended_population``, ``intended_inputs``).

Why in the manifest: who and what a model may be run on is a property of the model (of its
training data and validation), not of the site — a future adult model ships different bounds
without a code change. The site can still narrow or widen each rule in ``pneumo.toml``
(``[inference]``, docs/configuration.md); :mod:`inference.applicability` merges the two and
checks every image against the result.

Both objects are optional in a schema-1 manifest. Missing ``intended_inputs`` means the
runtime's chest-radiograph defaults below (what every model this runtime can load was built
for). Missing ``intended_population`` means the model declares no age range — the runtime does
not invent one — and only a ``pneumo.toml`` bound restricts ages then.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from inference.errors import ModelPackageError

_FILE = "model.json"

#: DX View (PS3.16 CID 4010) codes of the frontal views, SNOMED CT and the legacy SRT values
#: still sent by older modalities, mapped to the View Position (0018,5101) term they stand for.
FRONTAL_VIEW_CODES: Mapping[tuple[str, str], str] = {
    ("SCT", "399348003"): "AP",  # antero-posterior
    ("SRT", "R-10206"): "AP",
    ("SCT", "272479007"): "PA",  # postero-anterior
    ("SRT", "R-10214"): "PA",
}


@dataclass(frozen=True, slots=True)
class IntendedUse:
    """What the model may be applied to. Ages are in years, ``[min_age_years, max_age_years)``."""

    modalities: frozenset[str] = frozenset({"CR", "DX"})
    body_parts: frozenset[str] = frozenset({"CHEST"})
    view_positions: frozenset[str] = frozenset({"AP", "PA"})
    view_codes: Mapping[tuple[str, str], str] | None = None
    photometric_interpretations: frozenset[str] = frozenset({"MONOCHROME1", "MONOCHROME2"})
    min_bits_stored: int = 8
    max_bits_stored: int = 16
    min_age_years: float | None = None
    max_age_years: float | None = None
    population: str = ""

    @property
    def frontal_view_codes(self) -> Mapping[tuple[str, str], str]:
        """View Code Sequence codes that count as a View Position (default: CID 4010 AP/PA)."""
        return FRONTAL_VIEW_CODES if self.view_codes is None else self.view_codes


def _terms(raw: Mapping[str, Any], key: str, path: str, default: frozenset[str]) -> frozenset[str]:
    if key not in raw:
        return default
    value = raw[key]
    if not (isinstance(value, list) and value and all(isinstance(v, str) and v.strip() for v in value)):
        raise ModelPackageError(f"{_FILE}: '{path}{key}' must be a non-empty list of strings, got {value!r}")
    return frozenset(v.strip().upper() for v in value)


def _number(raw: Mapping[str, Any], key: str, path: str) -> float | None:
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 150:
        raise ModelPackageError(f"{_FILE}: '{path}{key}' must be a number of years in [0, 150], got {value!r}")
    return float(value)


def _bits(raw: Mapping[str, Any], key: str, default: int) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 16:
        raise ModelPackageError(f"{_FILE}: 'intended_inputs.{key}' must be an integer in [1, 16], got {value!r}")
    return value


def _view_codes(raw: Mapping[str, Any]) -> Mapping[tuple[str, str], str] | None:
    value = raw.get("view_codes")
    if value is None:
        return None
    codes: dict[tuple[str, str], str] = {}
    if not isinstance(value, list):
        raise ModelPackageError(f"{_FILE}: 'intended_inputs.view_codes' must be a list of objects")
    for entry in value:
        if not (isinstance(entry, dict) and all(isinstance(entry.get(k), str) for k in ("scheme", "value", "view"))):
            raise ModelPackageError(
                f"{_FILE}: each 'intended_inputs.view_codes' entry needs string 'scheme', 'value' and 'view', "
                f"got {entry!r}"
            )
        codes[(entry["scheme"].strip().upper(), entry["value"].strip())] = entry["view"].strip().upper()
    return codes


def parse_intended_use(manifest: Mapping[str, Any]) -> IntendedUse:
    """Validate the optional ``intended_population`` and ``intended_inputs`` objects."""
    population = manifest.get("intended_population", {})
    inputs = manifest.get("intended_inputs", {})
    for key, value in (("intended_population", population), ("intended_inputs", inputs)):
        if not isinstance(value, dict):
            raise ModelPackageError(f"{_FILE}: '{key}' must be an object when present")
    defaults = IntendedUse()
    low = _number(population, "min_age_years", "intended_population.")
    high = _number(population, "max_age_years", "intended_population.")
    if low is not None and high is not None and not low < high:
        raise ModelPackageError(
            f"{_FILE}: 'intended_population' needs min_age_years < max_age_years, got [{low}, {high})"
        )
    min_bits = _bits(inputs, "min_bits_stored", defaults.min_bits_stored)
    max_bits = _bits(inputs, "max_bits_stored", defaults.max_bits_stored)
    if min_bits > max_bits:
        raise ModelPackageError(f"{_FILE}: 'intended_inputs' needs min_bits_stored <= max_bits_stored")
    p = "intended_inputs."
    return IntendedUse(
        modalities=_terms(inputs, "modalities", p, defaults.modalities),
        body_parts=_terms(inputs, "body_parts", p, defaults.body_parts),
        view_positions=_terms(inputs, "view_positions", p, defaults.view_positions),
        view_codes=_view_codes(inputs),
        photometric_interpretations=_terms(
            inputs, "photometric_interpretations", p, defaults.photometric_interpretations
        ),
        min_bits_stored=min_bits,
        max_bits_stored=max_bits,
        min_age_years=low,
        max_age_years=high,
        population=str(population.get("description", "")),
    )
