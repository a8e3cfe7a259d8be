"""Dataset loaders: NusaX, its languages' adaptation text and English NLI pairs (bundled), AmericasNLI /
AmericasNLP text (local directory), any text files of a language, and hub fall-backs.

All loaders return plain Python lists (:class:`Example` records or strings) and raise
:class:`deftx.errors.DataError` with a one-line message for unknown languages, bad splits and malformed
files.  The ``datasets`` package is imported only when a hub source is requested.
"""

from deftx.data.americasnli import load_americasnli, load_americasnlp_text, load_multinli
from deftx.data.examples import AMERICASNLI_LABELS, NUSAX_LABELS, Example
from deftx.data.languages import (
    AMERICASNLI_LANGUAGES,
    NUSAX_LANGUAGE_NAMES,
    NUSAX_LANGUAGES,
    check_language,
)
from deftx.data.nli_en import load_english_nli
from deftx.data.nusax import load_nusax_mt_text, load_nusax_senti
from deftx.data.text import load_language_text, split_held_out, text_sources

__all__ = [
    "AMERICASNLI_LABELS",
    "AMERICASNLI_LANGUAGES",
    "NUSAX_LABELS",
    "NUSAX_LANGUAGES",
    "NUSAX_LANGUAGE_NAMES",
    "Example",
    "check_language",
    "load_americasnli",
    "load_americasnlp_text",
    "load_english_nli",
    "load_language_text",
    "load_multinli",
    "load_nusax_mt_text",
    "load_nusax_senti",
    "split_held_out",
    "text_sources",
]
