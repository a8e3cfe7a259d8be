"""The bundled adaptation text and English NLI data: they load, their sources resolve by name, and
the text does not leak NusaX evaluation sentences (re-checked from the files on every run)."""

from __future__ import annotations

import gzip
import unicodedata

import pytest

from deftx.data import NUSAX_LANGUAGES, load_nusax_senti
from deftx.data.nli_en import load_english_nli
from deftx.data.text import (
    NUSAX_MT_TRAIN,
    _bundled_files,
    is_held_out,
    load_language_text,
    read_text_file,
    resolve_sources,
    split_held_out,
    text_sources,
)
from deftx.errors import DataError

# lines per bundled file, as listed in deftx/data/nusax_text/ATTRIBUTION.md
BUNDLED_LINES = {
    ("ace", "nllb_seed"): 6190, ("ban", "nllb_seed"): 6189, ("bjn", "nllb_seed"): 6189,
    ("bug", "nllb_seed"): 6187, ("bug", "nusawrites_paragraph"): 1000,
    ("jav", "nusawrites_paragraph"): 8903, ("jav", "nusawrites_translation"): 9374,
    ("mad", "nusawrites_paragraph"): 5177, ("mad", "nusawrites_translation"): 9386,
    ("min", "nusawrites_paragraph"): 7626, ("min", "nusawrites_translation"): 9384,
    ("min", "minangnlp_wiki_mt"): 21172,
    ("sun", "nusawrites_paragraph"): 8621, ("sun", "nusawrites_translation"): 9371,
    ("bbc", "nusawrites_paragraph"): 4888, ("bbc", "nusawrites_translation"): 9395,
    ("ind", "nusawrites_translation"): 9261, ("ind", "minangnlp_wiki_mt"): 20912,
}
EVALUATED = [code for code in NUSAX_LANGUAGES if code != "eng"]   # NusaX-Senti's 11 languages
NGRAM = 8


def _norm(text: str) -> str:
    return " ".join(unicodedata.normalize("NFC", text).lower().split())


def _ngrams(text: str, n: int = NGRAM) -> set[tuple[str, ...]]:
    words = text.split()
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


@pytest.fixture(scope="module")
def evaluation_sentences() -> dict[str, set[str]]:
    """Normalised NusaX valid + test sentences per language (NusaX-MT valid/test are the same
    sentences as NusaX-Senti valid/test)."""
    return {code: {_norm(e.text) for split in ("valid", "test") for e in load_nusax_senti(code, split)}
            for code in EVALUATED}


def test_every_bundled_file_is_listed_and_has_its_line_count():
    found = {(lang, name): entry for lang in NUSAX_LANGUAGES for name, entry in _bundled_files(lang).items()}
    assert set(found) == set(BUNDLED_LINES)
    for key, entry in found.items():
        assert len(read_text_file(entry)) == BUNDLED_LINES[key], key
    assert text_sources("nij") == [NUSAX_MT_TRAIN]           # Ngaju: NusaX-MT train only
    assert text_sources("min") == [NUSAX_MT_TRAIN, "minangnlp_wiki_mt", "nusawrites_paragraph",
                                   "nusawrites_translation"]
    assert text_sources("aym") == []


def test_no_adaptation_line_leaks_a_nusax_evaluation_sentence(evaluation_sentences):
    """No line of any bundled text file equals a NusaX valid/test sentence of any language, or
    shares a word 8-gram with a valid/test sentence of its own language (after NFC, lowercasing
    and collapsing whitespace)."""
    every_language = set().union(*evaluation_sentences.values())
    problems = []
    for lang in NUSAX_LANGUAGES:
        own = evaluation_sentences.get(lang, set())
        own_ngrams = set().union(*(_ngrams(s) for s in own)) if own else set()
        for name, entry in _bundled_files(lang).items():
            for number, line in enumerate(read_text_file(entry), start=1):
                text = _norm(line)
                if text in every_language:
                    problems.append(f"{lang}/{name}:{number} equals an evaluation sentence")
                elif own_ngrams and not own_ngrams.isdisjoint(_ngrams(text)):
                    problems.append(f"{lang}/{name}:{number} shares an 8-gram with {lang} valid/test")
    assert problems == []


def test_leakage_check_finds_a_planted_sentence(evaluation_sentences):
    """The control: the same rules flag a line that is a test sentence, or contains 8 of its words."""
    sentence = sorted(s for s in evaluation_sentences["jav"] if len(s.split()) >= 12)[0]
    words = sentence.split()
    own_ngrams = set().union(*(_ngrams(s) for s in evaluation_sentences["jav"]))
    assert _norm(sentence.upper()) in evaluation_sentences["jav"]
    assert not own_ngrams.isdisjoint(_ngrams("kata liya " + " ".join(words[2:10]) + " pungkasan"))
    assert own_ngrams.isdisjoint(_ngrams(" ".join(words[2:9])))   # 7 words are not 8


def test_sources_resolve_and_load_in_order_without_repeats(tmp_path):
    mine = tmp_path / "mine.txt.gz"
    mine.write_bytes(gzip.compress("sapa kowe\n\n  sugeng   enjing \nsapa kowe\n".encode()))
    assert resolve_sources("jav", "all") == [NUSAX_MT_TRAIN, "nusawrites_paragraph", "nusawrites_translation"]
    assert resolve_sources("jav", ["nusawrites_translation", "all"]) == [
        "nusawrites_translation", NUSAX_MT_TRAIN, "nusawrites_paragraph"]
    lines = load_language_text("jav", [NUSAX_MT_TRAIN, str(mine)])
    assert lines[-2:] == ["sapa kowe", "sugeng enjing"] and len(lines) == 502
    everything = load_language_text("jav", "all")
    assert len(everything) == len(set(everything)) >= 8903 + 9374
    assert load_language_text("nij") == load_language_text("nij", "all")


@pytest.mark.parametrize("sources, message", [
    ("wikipedia", "unknown text source 'wikipedia' for jav; valid: nusax_mt_train, nusawrites_paragraph"),
    ([], "no text source given for jav"),
    ("missing/file.txt", "missing/file.txt: no such text file"),
])
def test_bad_sources_are_refused_with_one_line(sources, message):
    with pytest.raises(DataError) as err:
        load_language_text("jav", sources)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_language_without_bundled_text_needs_files(tmp_path):
    with pytest.raises(DataError, match="bundles no text for 'xyz'"):
        resolve_sources("xyz", "all")
    own = tmp_path / "xyz.txt"
    own.write_text("una linea\notra linea\n", encoding="utf-8")
    assert load_language_text("xyz", [str(own)]) == ["una linea", "otra linea"]
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe bad")
    with pytest.raises(DataError, match="not UTF-8"):
        load_language_text("xyz", [str(tmp_path / "bad.txt")])


def test_held_out_slice_depends_on_each_line_alone():
    lines = load_language_text("sun", "all")
    train, held = split_held_out(lines, 0.05)
    assert len(train) + len(held) == len(lines) and not set(train) & set(held)
    assert 0.04 < len(held) / len(lines) < 0.06
    _, held_subset = split_held_out(lines[::3], 0.05)
    assert set(held_subset) == set(held) & set(lines[::3])     # adding lines moves no line across
    with pytest.raises(ValueError):
        split_held_out(lines, 1.0)


def test_english_nli_pairs_load_with_their_labels():
    pairs = load_english_nli()
    assert len(pairs) == 19655
    counts = [sum(p.label == i for p in pairs) for i in range(3)]
    assert counts == [3479 + 3327, 3123 + 3235, 3213 + 3278]    # entailment, neutral, contradiction
    assert all(p.text and p.text_pair and p.language == "eng" for p in pairs)
    assert len(load_english_nli(["snli_dev"])) == 9840
    with pytest.raises(DataError, match="unknown English NLI file 'xnli_dev'"):
        load_english_nli(["xnli_dev"])


def test_tasks_read_the_configured_text(tmp_path):
    """``language_sft.text`` reaches the tasks' text readers: the default stays each task's own
    text, named sources and files replace it."""
    from deftx.tasks import task_spec

    nusax = task_spec("nusax_senti")
    assert len(nusax.text("jav", "bundled")) == 500
    assert len(nusax.text("jav", "bundled", ["nusawrites_translation"])) == 9374
    own = tmp_path / "aym.txt"
    own.write_text("suma uru\njallalla\n", encoding="utf-8")
    assert task_spec("americasnli").text("aym", str(tmp_path), [str(own)]) == ["suma uru", "jallalla"]


def test_adaptation_text_keeps_the_held_out_slice_out_of_training():
    """``language_sft.held_out``: the training part and the held-out part split the text; the cap
    (``max_train_examples``) applies to the training part only; 0 trains on everything."""
    from deftx.config import SFTConfig
    from deftx.tasks import task_spec

    nusax = task_spec("nusax_senti")
    every = nusax.text("sun", "bundled", ["all"])
    cfg = SFTConfig(text=["all"], held_out=0.05)
    train = nusax.adaptation_text("sun", "bundled", cfg)
    held = nusax.adaptation_text("sun", "bundled", cfg, "held_out")
    assert sorted(train + held) == sorted(every) and not set(train) & set(held)
    assert held == [line for line in every if is_held_out(line, 0.05)]
    capped = nusax.adaptation_text("sun", "bundled", SFTConfig(text=["all"], held_out=0.05, max_train_examples=100))
    assert capped == train[:100]
    assert nusax.adaptation_text("sun", "bundled", SFTConfig(text=["all"])) == every
    assert nusax.adaptation_text("sun", "bundled", SFTConfig(), "held_out") == []
    with pytest.raises(ValueError, match="unknown part"):
        nusax.adaptation_text("sun", "bundled", cfg, "test")


def test_language_sfts_and_the_head_warm_up_never_train_on_held_out_lines(tiny_model_dir, monkeypatch, tmp_path):
    """What the masked-LM streams are built from, in the language SFT and in the shared head
    warm-up, with a third of the text held out."""
    import deftx.jobs.recipes as recipes
    from deftx.config import load_pipeline_config
    from deftx.jobs.executors import LocalExecutor
    from deftx.jobs.recipes import train_language_sft
    from deftx.jobs.spec import HeadJob
    from deftx.models import load_tokenizer

    seen: list[list[str]] = []

    class Seen(Exception):
        pass

    def capture(tokenizer, texts, **kwargs):
        seen.append(list(texts))
        raise Seen

    monkeypatch.setattr(recipes, "masked_lm_stream", capture)
    cfg = load_pipeline_config(overrides=["language_sft.held_out=0.3", "language_sft.head_warmup_steps=2",
                                          f"model.name_or_path={tiny_model_dir}", "target_languages=[jav]"])
    tokenizer = load_tokenizer(str(tiny_model_dir))
    with pytest.raises(Seen):
        train_language_sft(str(tiny_model_dir), tokenizer, "jav", cfg.language_sft, model_id="tiny",
                           data_source="bundled", max_length=32, seed=0, log=lambda line: None)
    with pytest.raises(Seen):       # the pipeline's head job, as an executor runs it
        LocalExecutor().run(HeadJob(cfg, "tiny-fingerprint"), tmp_path / "head", lambda line: None)
    language, head = seen
    assert 300 < len(language) < 400 and not any(is_held_out(line, 0.3) for line in language + head)
    assert len(head) > len(language)            # ind and jav

def test_a_lang_placeholder_names_each_languages_own_file(tmp_path):
    """One ``language_sft.text`` setting for many languages: ``{lang}`` in a path is the code."""
    for lang, words in (("aym", "suma uru"), ("gn", "mba'eichapa")):
        (tmp_path / f"train.{lang}").write_text(f"{words}\n", encoding="utf-8")
    pattern = str(tmp_path / "train.{lang}")
    assert load_language_text("aym", [pattern]) == ["suma uru"]
    assert load_language_text("gn", [pattern]) == ["mba'eichapa"]
    with pytest.raises(DataError, match=r"train\.quy: no such text file"):
        load_language_text("quy", [pattern])
