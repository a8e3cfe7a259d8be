"""SFTs and the Hugging Face Hub: the download path read from a local repository laid out as
huggingface_hub caches it, model cards, and the upload call (the Hub itself is not reachable)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from helpers import cache_repo

from deftx.cli import main
from deftx.core.card import CARD_FILE
from deftx.core.sft import HUB_FILES, SFTMetadata, SparseDelta, SparseFineTuning
from deftx.errors import SFTFormatError

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _sft(language: str = "jav", seed: int = 0) -> SparseFineTuning:
    gen = torch.Generator().manual_seed(seed)
    diffs = {"encoder.layer.0.attention.self.query.weight":
             SparseDelta((8, 8), torch.tensor([3, 17, 40]), torch.randn(3, generator=gen))}
    meta = SFTMetadata(kind="language", language=language, method="deft_x", selection={"rank": 8},
                       base_model="xlm-roberta-base", base_fingerprint="sha256:" + "ab" * 32)
    return SparseFineTuning(diffs, {}, meta)


@pytest.fixture()
def hub_cache(tmp_path):
    sft = _sft()
    sft.save(tmp_path / "v1")
    _sft(seed=1).save(tmp_path / "v2")
    cache = tmp_path / "hub-cache"
    cache_repo(cache, "org/jav-sft", tmp_path / "v1", refs=("main",))
    cache_repo(cache, "org/jav-sft", tmp_path / "v2", commit="f" * 40, refs=("v2",))
    return cache, tmp_path


def _same(a: SparseFineTuning, b: SparseFineTuning) -> bool:
    return a.diffs.keys() == b.diffs.keys() and all(
        torch.equal(a.diffs[n].indices, b.diffs[n].indices) and torch.equal(a.diffs[n].values, b.diffs[n].values)
        for n in a.diffs)


def test_from_pretrained_reads_the_hub_cache_by_branch_tag_and_commit(hub_cache):
    cache, tmp = hub_cache
    v1, v2 = SparseFineTuning.load(tmp / "v1"), SparseFineTuning.load(tmp / "v2")
    main_ = SparseFineTuning.from_pretrained("org/jav-sft", cache_dir=cache, local_files_only=True)
    assert _same(main_, v1) and main_.source == "org/jav-sft"
    assert _same(SparseFineTuning.from_pretrained("org/jav-sft", revision=COMMIT, cache_dir=cache,
                                                  local_files_only=True), v1)
    tagged = SparseFineTuning.from_pretrained("org/jav-sft", revision="v2", cache_dir=cache, local_files_only=True)
    assert _same(tagged, v2) and not _same(tagged, v1) and tagged.source == "org/jav-sft@v2"
    assert _same(SparseFineTuning.from_pretrained(tmp / "v1"), v1)   # a local directory is read directly


def test_a_corrupt_cached_file_is_caught_by_the_checksum(hub_cache):
    cache, _ = hub_cache
    blob = next(p for p in (cache / "models--org--jav-sft" / "snapshots" / COMMIT).iterdir()
                if p.name == "sft.safetensors").resolve()
    blob.write_bytes(blob.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(SFTFormatError, match="checksum mismatch"):
        SparseFineTuning.from_pretrained("org/jav-sft", cache_dir=cache, local_files_only=True)


def test_unknown_repository_or_revision_is_one_line(hub_cache):
    cache, _ = hub_cache
    for repo, revision in (("org/other", None), ("org/jav-sft", "no-such-branch")):
        with pytest.raises(SFTFormatError, match="not in the Hub cache") as info:
            SparseFineTuning.from_pretrained(repo, revision=revision, cache_dir=cache, local_files_only=True)
        assert "\n" not in str(info.value) and repo in str(info.value)


def test_sft_pull_cli(hub_cache, capsys):
    cache, tmp = hub_cache
    assert main(["sft", "pull", "org/jav-sft", "--cache-dir", str(cache), "--offline"]) == 0
    path = Path(capsys.readouterr().out.strip())
    assert path.parent.name == "snapshots" or path.name == COMMIT
    assert sorted(p.name for p in path.iterdir()) == sorted(HUB_FILES)
    out = tmp / "pulled"
    assert main(["sft", "pull", "org/jav-sft", "--revision", "v2", "--cache-dir", str(cache), "--offline",
                 "--output-dir", str(out)]) == 0
    assert _same(SparseFineTuning.load(out), SparseFineTuning.load(tmp / "v2"))
    assert main(["sft", "pull", "org/jav-sft", "--cache-dir", str(cache), "--offline", "--output-dir", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_the_model_card_describes_the_sft(tmp_path):
    path = _sft().save(tmp_path / "sft")
    card = (path / CARD_FILE).read_text(encoding="utf-8")
    front, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    assert "library_name: deftx" in front and 'base_model: "xlm-roberta-base"' in front
    assert "- jav" in front and "- deft-x" in front and "- language-sft" in front
    assert "# Language SFT: jav" in body
    assert "| K (changed entries) | 3 of 64 body entries (4.688%) |" in body
    assert "sha256:" + "ab" * 32 in body and '{"rank": 8}' in body
    assert "deftx sft compose --task TASK_SFT_DIR --lang-sft THIS_SFT_DIR --output-dir" in body   # current flags
    # a local base-model path is not a Hub link
    local = _sft()
    local.metadata.base_model = "/models/e5"
    assert "base_model:" not in (local.save(tmp_path / "local") / CARD_FILE).read_text().split("---\n")[1]


def test_push_to_hub_uploads_the_sft_files_in_one_commit(monkeypatch, tmp_path):
    """The upload is a thin call to huggingface_hub: check what it is asked to do."""
    import huggingface_hub

    calls: list[tuple[str, dict]] = []

    class FakeApi:
        def __init__(self, **kwargs):
            calls.append(("init", kwargs))

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

        def create_branch(self, repo_id, **kwargs):
            calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))

        def upload_folder(self, **kwargs):
            folder = Path(kwargs["folder_path"])
            calls.append(("upload_folder", {**kwargs, "files": sorted(p.name for p in folder.iterdir())}))
            shutil.copytree(folder, tmp_path / "uploaded")
            return type("Info", (), {"commit_url": "https://huggingface.co/org/x/commit/1"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    sft = _sft()
    sft.save(tmp_path / "sft")
    assert main(["sft", "push", str(tmp_path / "sft"), "org/x", "--private", "--revision", "v1"]) == 0
    names = [c[0] for c in calls]
    assert names == ["init", "create_repo", "create_branch", "upload_folder"]
    create, upload = calls[1][1], calls[3][1]
    assert create == {"repo_id": "org/x", "private": True, "exist_ok": True}
    assert upload["repo_id"] == "org/x" and upload["revision"] == "v1"
    assert set(upload["allow_patterns"]) == set(HUB_FILES) and set(upload["files"]) >= set(HUB_FILES)
    assert _same(SparseFineTuning.load(tmp_path / "uploaded"), sft)
