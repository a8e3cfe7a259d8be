"""Tests for deftx.data: bundled NusaX, local AmericasNLI (skipped without the data), error messages, and the
hub code paths with a fake ``datasets.load_dataset`` (no network)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from helpers import release_data

from deftx.data import (
    AMERICASNLI_LABELS,
    AMERICASNLI_LANGUAGES,
    NUSAX_LABELS,
    NUSAX_LANGUAGE_NAMES,
    NUSAX_LANGUAGES,
    Example,
    check_language,
    load_americasnli,
    load_americasnlp_text,
    load_english_nli,
    load_multinli,
    load_nusax_mt_text,
    load_nusax_senti,
)
from deftx.data.examples import read_table
from deftx.errors import DataError
from deftx.tasks import task_spec

NUSAX_DIR = release_data("nusax") or Path("nusax-release-not-given")
ANLI_DIR = release_data("americasnli") or Path("americasnli-release-not-given")
needs_nusax_dir = pytest.mark.skipif(not NUSAX_DIR.is_dir(), reason="no NusaX release copy (DEFTX_TEST_DATA)")
needs_anli = pytest.mark.skipif(not ANLI_DIR.is_dir(), reason="no AmericasNLI release copy (DEFTX_TEST_DATA)")

# (split, rows, negative, neutral, positive) -- identical for every language (the data are parallel)
NUSAX_SPLITS = [("train", 500, 192, 119, 189), ("valid", 100, 38, 24, 38), ("test", 400, 153, 96, 151)]


# ---------------------------------------------------------------------------------------------- languages


def test_language_tables_are_consistent():
    assert len(NUSAX_LANGUAGES) == 12 and set(NUSAX_LANGUAGE_NAMES) == set(NUSAX_LANGUAGES)
    assert NUSAX_LANGUAGES["bbc"] == "toba_batak" and NUSAX_LANGUAGE_NAMES["jav"] == "Javanese"
    assert sorted(AMERICASNLI_LANGUAGES) == "aym bzd cni gn hch nah oto quy shp tar".split()


@pytest.mark.parametrize(
    "code, dataset, expected",
    [("jav", "nusax", "jav"), (" JAV ", "nusax", "jav"), ("gn", "americasnli", "gn")],
)
def test_check_language_accepts_known_codes(code, dataset, expected):
    assert check_language(code, dataset) == expected


@pytest.mark.parametrize(
    "code, dataset, fragments",
    [
        ("xyz", "nusax", ["unknown NusaX language 'xyz'", "valid: ace, ban, bbc,", "sun"]),
        ("javanese", "nusax", ["'javanese'", "jav"]),
        ("jav", "americasnli", ["unknown AmericasNLI language 'jav'", "aym", "tar"]),
        ("jav", "xnli", ["unknown dataset 'xnli'", "americasnli, nusax"]),
    ],
)
def test_check_language_rejects_with_valid_codes(code, dataset, fragments):
    with pytest.raises(DataError) as info:
        check_language(code, dataset)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


# ------------------------------------------------------------------------------------------ NusaX senti


@pytest.mark.parametrize("code", sorted(NUSAX_LANGUAGES))
@pytest.mark.parametrize("split, rows, neg, neu, pos", NUSAX_SPLITS)
def test_bundled_nusax_senti_counts(code, split, rows, neg, neu, pos):
    examples = load_nusax_senti(code, split)
    assert len(examples) == rows
    assert all(isinstance(e, Example) and e.language == code and e.text_pair is None for e in examples)
    assert all(e.text and e.text == e.text.strip() for e in examples)
    assert Counter(e.label for e in examples) == {0: neg, 1: neu, 2: pos}


def test_validation_alias_and_label_order():
    assert load_nusax_senti("ind", "validation") == load_nusax_senti("ind", "valid")
    assert NUSAX_LABELS == ("negative", "neutral", "positive")
    first = load_nusax_senti("jav", "train")[0]  # id 219, "... kertu kredit bni!", neutral
    assert first.text.startswith("Nikmatono cicilan 0%") and NUSAX_LABELS[first.label] == "neutral"


@needs_nusax_dir
@pytest.mark.parametrize("code", ["jav", "bbc", "eng"])
@pytest.mark.parametrize("directory", [NUSAX_DIR, NUSAX_DIR / "datasets"])
def test_bundled_equals_directory_source(code, directory):
    for split in ("train", "valid", "test"):
        assert load_nusax_senti(code, split, source=directory) == load_nusax_senti(code, split)
    assert load_nusax_mt_text(code, source=str(directory)) == load_nusax_mt_text(code)


# --------------------------------------------------------------------------------------------- NusaX MT


@pytest.mark.parametrize("code", sorted(NUSAX_LANGUAGES))
def test_mt_text_is_the_train_column_of_that_language(code):
    texts = load_nusax_mt_text(code)
    assert len(texts) == 500
    assert all(t and t == t.strip() and "\n" not in t for t in texts)
    # NusaX-MT train holds the same sentences as NusaX-Senti train: a wrong column would not overlap.
    senti = {" ".join(e.text.split()) for e in load_nusax_senti(code, "train")}
    assert set(texts) == senti


def test_mt_text_first_lines():
    assert load_nusax_mt_text("eng")[0].startswith("Enjoy 0% instalment")
    assert load_nusax_mt_text("ind")[0].startswith("Nikmati cicilan 0% hingga 12 bulan")


# ------------------------------------------------------------------------------------------- NusaX errors


def _write_nusax(tmp_path: Path, content: str, split: str = "train", lang_dir: str = "javanese") -> Path:
    directory = tmp_path / "datasets" / "sentiment" / lang_dir
    directory.mkdir(parents=True)
    file = directory / f"{split}.csv"
    file.write_text(content, encoding="utf-8")
    return file


@pytest.mark.parametrize("split", ["dev", "training", "Train", ""])
def test_bad_nusax_split(split):
    with pytest.raises(DataError, match="unknown NusaX split"):
        load_nusax_senti("jav", split)


@pytest.mark.parametrize(
    "content, fragments",
    [
        ("id,text\n1,hello\n", ["missing column 'label'", "header: id, text"]),
        ('id,text,label\n1,"ok, fine",positive\n2,meh,sad\n', ["line 3", "unknown label 'sad'"]),
        (
            'id,text,label\n1,"multi\nline",neutral\n2,x,positive,extra\n',
            ["line 4", "expected 3 fields, got 4"],
        ),
        ("id,text,label\n1,  ,neutral\n", ["line 2", "empty text"]),
        ("id,text,label\n", ["no data rows"]),
        ("", ["empty file"]),
    ],
)
def test_malformed_nusax_csv_names_the_file(tmp_path, content, fragments):
    file = _write_nusax(tmp_path, content)
    with pytest.raises(DataError) as info:
        load_nusax_senti("jav", "train", source=tmp_path)
    message = str(info.value)
    assert str(file) in message
    for fragment in fragments:
        assert fragment in message


def test_directory_source_missing_file_and_bad_source(tmp_path):
    _write_nusax(tmp_path, "id,text,label\n1,x,positive\n")
    assert load_nusax_senti("jav", "train", source=tmp_path / "datasets") == [Example("x", 2, language="jav")]
    with pytest.raises(DataError, match=r"missing data file: .*javanese/test\.csv"):
        load_nusax_senti("jav", "test", source=tmp_path)
    with pytest.raises(DataError, match=r"missing data file: .*mt/train\.csv"):
        load_nusax_mt_text("jav", source=tmp_path)
    with pytest.raises(DataError, match="is not 'bundled', 'hub' or a NusaX directory"):
        load_nusax_senti("jav", "train", source=tmp_path / "nowhere")


def test_mt_missing_language_column(tmp_path):
    (tmp_path / "mt").mkdir()
    (tmp_path / "mt" / "train.csv").write_text(",indonesian,english\n0,a,b\n", encoding="utf-8")
    assert load_nusax_mt_text("eng", source=tmp_path) == ["b"]
    with pytest.raises(DataError, match="missing column 'javanese'"):
        load_nusax_mt_text("jav", source=tmp_path)


# ------------------------------------------------------------------------------------------- AmericasNLI


@needs_anli
@pytest.mark.parametrize(
    "code, split, release, rows",
    [
        ("aym", "dev", "final", 743),
        ("aym", "validation", "final", 743),
        ("aym", "test", "final", 750),
        ("nah", "test", "final", 738),
        ("nah", "test", "v1", 738),
        ("nah", "dev", "final", 585),
        ("nah", "dev", "v1", 376),
        ("oto", "dev", "final", 222),
        ("cni", "dev", "v1", 658),
    ],
)
def test_americasnli_counts(code, split, release, rows):
    examples = load_americasnli(code, split, ANLI_DIR, dev_release=release)
    assert len(examples) == rows
    assert all(e.language == code and e.text_pair is not None for e in examples)
    assert sum(1 for e in examples if not e.text or not e.text_pair) <= 3  # nah test: 3 blank premises (kept)
    counts = Counter(e.label for e in examples)
    assert set(counts) == {0, 1, 2} and max(counts.values()) - min(counts.values()) <= rows // 10


@needs_anli
def test_americasnli_double_quotes_survive():
    examples = load_americasnli("aym", "test", str(ANLI_DIR))
    quoted = [e for e in examples if '"Tatanaka, wali kusa jamuqanakawa"' in e.text]
    assert quoted and quoted[0].text.startswith("Kennedy irptirix pilutunakarux")
    assert [AMERICASNLI_LABELS[e.label] for e in quoted[:2]] == ["contradiction", "neutral"]  # ids 25315/6


@needs_anli
@pytest.mark.parametrize(
    "code, lines", [("gn", 26032), ("aym", 6531), ("nah", 16145), ("quy", 9643), ("cni", 3883)]
)
def test_americasnlp_text_counts(code, lines):
    texts = load_americasnlp_text(code, ANLI_DIR)
    assert abs(len(texts) - lines) <= lines // 50  # "roughly" the README's line counts
    assert all(t and t == t.strip() for t in texts)
    assert not texts[0].startswith("\ufeff")


@needs_anli
def test_americasnlp_text_max_lines_and_direct_directory():
    assert len(load_americasnlp_text("gn", ANLI_DIR, max_lines=100)) == 100
    assert load_americasnlp_text("gn", ANLI_DIR / "unlabeled" / "americasnlp2021", max_lines=5) == (
        load_americasnlp_text("gn", ANLI_DIR, max_lines=5)
    )


BUNDLED_ANLI_ROWS = {"aym": (743, 750), "bzd": (743, 750), "cni": (658, 750), "gn": (743, 750), "hch": (743, 750),
                     "nah": (585, 738), "oto": (222, 748), "quy": (743, 750), "shp": (743, 750), "tar": (743, 750)}


def test_bundled_americasnli_has_every_language_with_the_release_counts():
    """The final release's dev and test rows as its attribution file lists them, labels balanced."""
    assert set(BUNDLED_ANLI_ROWS) == set(AMERICASNLI_LANGUAGES)
    for code, (dev, test) in BUNDLED_ANLI_ROWS.items():
        for split, rows in (("dev", dev), ("test", test)):
            examples = load_americasnli(code, split, "bundled")
            assert len(examples) == rows and all(e.language == code for e in examples)
            counts = Counter(e.label for e in examples)
            assert set(counts) == {0, 1, 2} and max(counts.values()) - min(counts.values()) <= rows // 10
    quoted = [e for e in load_americasnli("aym", "test", "bundled") if '"Tatanaka, wali kusa jamuqanakawa"' in e.text]
    assert quoted and quoted[0].text.startswith("Kennedy irptirix pilutunakarux")


@needs_anli
@pytest.mark.parametrize("split", ["dev", "test"])
def test_bundled_americasnli_equals_the_release_files(split):
    for code in AMERICASNLI_LANGUAGES:
        assert load_americasnli(code, split, "bundled") == load_americasnli(code, split, ANLI_DIR)


def test_the_english_source_data_shares_no_sentence_with_americasnli():
    """AmericasNLI dev/test are translations of XNLI's Spanish dev/test; no AmericasNLI string may be
    among the English NLI pairs a task SFT trains on (re-checked from the bundled files)."""
    english = {t for e in load_english_nli() for t in (e.text, e.text_pair)}
    anli = {t for code in AMERICASNLI_LANGUAGES for split in ("dev", "test")
            for e in load_americasnli(code, split, "bundled") for t in (e.text, e.text_pair) if len(t) > 20}
    assert len(anli) > 15000 and not english & anli


def test_bundled_americasnli_refuses_what_is_not_bundled(tmp_path):
    with pytest.raises(DataError, match="only the final AmericasNLI dev release is bundled"):
        load_americasnli("aym", "dev", "bundled", dev_release="v1")
    spec = task_spec("americasnli")
    with pytest.raises(DataError, match=r"aym: no text for its language SFT.*language_sft.text .*train\.\{lang\}"):
        spec.text("aym", "bundled")
    (tmp_path / "train.aym.txt").write_text("Jupax sanwa.\nMamita, utankastwa.\n", encoding="utf-8")
    assert spec.text("aym", "bundled", [str(tmp_path / "train.{lang}.txt")]) == ["Jupax sanwa.", "Mamita, utankastwa."]
    assert len(spec.train("aym", "bundled")) == 743                        # leave-fold-out training data


def test_a_corrupt_gzip_table_is_named(tmp_path):
    bad = tmp_path / "t.tsv.gz"
    bad.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="t.tsv.gz"):
        read_table(bad, delimiter="\t")


def test_americasnli_errors(tmp_path):
    with pytest.raises(DataError, match="unknown AmericasNLI language 'quz'"):
        load_americasnli("quz", "test", tmp_path)
    with pytest.raises(DataError, match="unknown AmericasNLI split 'train'"):
        load_americasnli("aym", "train", tmp_path)
    with pytest.raises(DataError, match="unknown AmericasNLI dev release 'v2'"):
        load_americasnli("aym", "dev", tmp_path, dev_release="v2")
    with pytest.raises(DataError, match="directory not found"):
        load_americasnli("aym", "test", tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"missing data file: .*nala-cub_v1/dev/aym\.tsv"):
        load_americasnli("aym", "dev", tmp_path, dev_release="v1")
    with pytest.raises(DataError, match=r"missing data file: .*train\.aym"):
        load_americasnlp_text("aym", tmp_path)
    with pytest.raises(DataError, match="max_lines"):
        load_americasnlp_text("aym", tmp_path, max_lines=-1)


@pytest.mark.parametrize(
    "rows, fragments",
    [
        (
            ['1\taym\tA "quoted" premise\thyp\tneutral', "2\taym\tp\th\tmaybe"],
            ["line 3", "unknown label 'maybe'"],
        ),
        (["1\taym\tp\th"], ["line 2", "expected 5 fields, got 4"]),
    ],
)
def test_malformed_americasnli_tsv_names_the_file(tmp_path, rows, fragments):
    (tmp_path / "test").mkdir()
    file = tmp_path / "test" / "aym.tsv"
    file.write_text("\n".join(["id\tlanguage\tpremise\thypothesis\tlabel", *rows]) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_americasnli("aym", "test", tmp_path)
    assert str(file) in str(info.value)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_americasnli_tsv_v1_layout_in_tmp(tmp_path):
    (tmp_path / "nala-cub_v1" / "dev").mkdir(parents=True)
    (tmp_path / "nala-cub_v1" / "dev" / "gn.tsv").write_text(
        'language\tpremise\thypothesis\tlabel\ngn\t"Che" he\'i\tNdaha\'éi\tcontradiction\n', encoding="utf-8"
    )
    assert load_americasnli("gn", "dev", tmp_path, dev_release="v1") == [
        Example('"Che" he\'i', 2, "Ndaha'éi", "gn")
    ]


# --------------------------------------------------------------------------------- hub paths (no network)


class _FakeHub:
    """Stands in for ``datasets.load_dataset``: records calls and returns in-memory records."""

    def __init__(self, records):
        self.records = records
        self.calls: list[tuple] = []

    def __call__(self, path, name=None, split=None, **kwargs):
        self.calls.append((path, name, split))
        return list(self.records)


@pytest.fixture
def fake_hub(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def install(records):
        fake = _FakeHub(records)
        monkeypatch.setattr(datasets, "load_dataset", fake)
        return fake

    return install


def test_hub_nusax_senti(fake_hub):
    fake = fake_hub(
        [
            {"id": "1", "text": " bagus ", "lang": "jav", "label": 2},
            {"id": "2", "text": "elek", "lang": "jav", "label": "negative"},
        ]
    )
    assert load_nusax_senti("jav", "valid", source="hub") == [Example("bagus", 2, language="jav"),
                                                               Example("elek", 0, language="jav")]
    assert fake.calls == [("indonlp/NusaX-senti", "jav", "validation")]


def test_hub_nusax_senti_bad_label(fake_hub):
    fake_hub([{"text": "x", "label": 3}])
    with pytest.raises(DataError, match="indonlp/NusaX-senti .*unknown label 3"):
        load_nusax_senti("sun", "train", source="hub")


def test_hub_nusax_mt_text(fake_hub):
    fake = fake_hub(
        [
            {"text_1": "Enjoy", "text_2": "Nikmatono\ncicilan", "text_1_lang": "eng", "text_2_lang": "jav"},
            {"id": "1", "text_1": "x", "text_2": "  ", "text_1_lang": "eng", "text_2_lang": "jav"},
        ]
    )
    assert load_nusax_mt_text("jav", source="hub") == ["Nikmatono cicilan"]
    assert fake.calls == [("indonlp/NusaX-MT", "eng-jav", "train")]
    assert load_nusax_mt_text("eng", source="hub") == ["Enjoy", "x"]
    assert fake.calls[-1] == ("indonlp/NusaX-MT", "eng-ind", "train")


def test_hub_americasnli(fake_hub):
    fake = fake_hub(
        [{"premise": "p", "hypothesis": "h", "label": 1}, {"premise": "q", "hypothesis": "k", "label": 2}]
    )
    assert load_americasnli("nah", "dev", "hub", dev_release="v1") == [
        Example("p", 1, "h", "nah"),
        Example("q", 2, "k", "nah"),
    ]
    assert len(load_americasnli("nah", "test", "hub")) == 2
    hub_id = "nala-cub/americas_nli"
    assert fake.calls == [(hub_id, "nah", "validation"), (hub_id, "nah", "test")]
    with pytest.raises(DataError, match="only has the v1 dev release"):
        load_americasnli("nah", "dev", "hub")


def test_hub_multinli_drops_unlabelled(fake_hub):
    fake = fake_hub(
        [
            {"premise": "a", "hypothesis": "b", "label": 0, "genre": "fiction"},
            {"premise": "c", "hypothesis": "d", "label": -1, "genre": "fiction"},
            {"premise": "e", "hypothesis": "f", "label": 2, "genre": "travel"},
        ]
    )
    assert load_multinli("validation_matched") == [Example("a", 0, "b", "eng"), Example("e", 2, "f", "eng")]
    assert fake.calls == [("nyu-mll/multi_nli", None, "validation_matched")]
    with pytest.raises(DataError, match="unknown MultiNLI split 'test'"):
        load_multinli("test")


def test_hub_missing_column(fake_hub):
    fake_hub([{"premise": "a", "label": 0}])
    with pytest.raises(DataError, match="no 'hypothesis' column"):
        load_multinli()


@pytest.mark.parametrize(
    "call, dataset_id",
    [
        (lambda: load_nusax_senti("jav", "test", source="hub"), "indonlp/NusaX-senti"),
        (lambda: load_nusax_mt_text("jav", source="hub"), "indonlp/NusaX-MT"),
        (lambda: load_americasnli("aym", "test", "hub"), "nala-cub/americas_nli"),
        (lambda: load_multinli(), "nyu-mll/multi_nli"),
    ],
)
def test_hub_failure_becomes_data_error(monkeypatch, call, dataset_id):
    datasets = pytest.importorskip("datasets")

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'huggingface.co'\n(second line of detail)")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(DataError) as info:
        call()
    message = str(info.value)
    assert f"could not load '{dataset_id}'" in message and "no network?" in message
    assert "Couldn't reach 'huggingface.co'" in message and "\n" not in message


def test_import_does_not_load_datasets():
    import subprocess
    import sys

    code = "import sys, deftx.data; print('datasets' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
