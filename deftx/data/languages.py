"""Language codes of the supported datasets and their validation.

Codes are the ones the datasets themselves use (ISO 639-3 for NusaX, the AmericasNLI file names for
AmericasNLI, where Guaraní is ``gn``).  :func:`check_language` is the single place that turns an unknown
code into a one-line :class:`~deftx.errors.DataError`.
"""

from __future__ import annotations

from deftx.errors import DataError

#: NusaX code -> directory name in the NusaX repository (``datasets/sentiment/<dir>``, MT column name).
NUSAX_LANGUAGES: dict[str, str] = {
    "ace": "acehnese",
    "ban": "balinese",
    "bjn": "banjarese",
    "bug": "buginese",
    "eng": "english",
    "ind": "indonesian",
    "jav": "javanese",
    "mad": "madurese",
    "min": "minangkabau",
    "nij": "ngaju",
    "sun": "sundanese",
    "bbc": "toba_batak",
}

#: NusaX code -> display name.
NUSAX_LANGUAGE_NAMES: dict[str, str] = {
    "ace": "Acehnese",
    "ban": "Balinese",
    "bjn": "Banjarese",
    "bug": "Buginese",
    "eng": "English",
    "ind": "Indonesian",
    "jav": "Javanese",
    "mad": "Madurese",
    "min": "Minangkabau",
    "nij": "Ngaju",
    "sun": "Sundanese",
    "bbc": "Toba Batak",
}

#: AmericasNLI code (file name stem) -> display name.
AMERICASNLI_LANGUAGES: dict[str, str] = {
    "aym": "Aymara",
    "bzd": "Bribri",
    "cni": "Asháninka",
    "gn": "Guaraní",
    "hch": "Wixárika",
    "nah": "Nahuatl",
    "oto": "Otomí",
    "quy": "Quechua",
    "shp": "Shipibo-Konibo",
    "tar": "Rarámuri",
}

_DATASETS: dict[str, tuple[str, dict[str, str]]] = {
    "nusax": ("NusaX", NUSAX_LANGUAGES),
    "americasnli": ("AmericasNLI", AMERICASNLI_LANGUAGES),
}


def check_language(code: str, dataset: str) -> str:
    """Return ``code`` (lower-cased, stripped) if it is a language of ``dataset``.

    ``dataset`` is ``"nusax"`` or ``"americasnli"``.  Raises :class:`DataError` with a one-line message
    listing the valid codes for an unknown code, and for an unknown dataset.
    """
    if dataset not in _DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; valid: {', '.join(sorted(_DATASETS))}")
    display, languages = _DATASETS[dataset]
    normalized = code.strip().lower() if isinstance(code, str) else code
    if normalized not in languages:
        raise DataError(f"unknown {display} language {code!r}; valid: {', '.join(sorted(languages))}")
    return normalized
