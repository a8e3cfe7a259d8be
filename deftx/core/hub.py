"""SFTs on the Hugging Face Hub: download into (or read from) the Hub cache, and upload.

A thin layer over ``huggingface_hub`` (imported when called, so ``deftx.core`` stays light):

* :func:`download` fetches a repository's files matching a few patterns with ``snapshot_download``,
  which keeps them in the standard Hub cache (``$HF_HUB_CACHE``, ``~/.cache/huggingface/hub``) and
  reads them from there when the Hub cannot be reached or ``local_files_only`` is set.
* :func:`upload` creates the repository if needed and uploads one directory's SFT files in one
  commit.

Errors from the Hub (unknown repository or revision, no network and nothing cached, refused
upload) become one-line :class:`deftx.errors.SFTFormatError` messages naming the repository.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from deftx import __version__
from deftx.errors import SFTFormatError, first_line

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_repo_id(value: str) -> bool:
    """``org/name`` that is not an existing local path."""
    return bool(_REPO_ID.match(value)) and not Path(value).exists()


def download(repo_id: str, patterns: Sequence[str], *, revision: str | None = None,
             cache_dir: str | Path | None = None, token: str | bool | None = None,
             local_files_only: bool = False) -> Path:
    """The local snapshot directory of ``repo_id`` at ``revision`` holding the files matching
    ``patterns`` (downloaded, or found in the cache)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    where = f"{repo_id}" + (f"@{revision}" if revision else "")
    try:
        path = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, token=token,
                                 local_files_only=local_files_only, allow_patterns=list(patterns),
                                 library_name="deftx", library_version=__version__)
    except RepositoryNotFoundError:
        raise SFTFormatError(f"{where}: no such repository on the Hub (or it is private: log in with "
                             f"`hf auth login` or pass a token)") from None
    except LocalEntryNotFoundError:
        raise SFTFormatError(f"{where}: the Hub cannot be reached and the repository is not in the Hub cache "
                             f"({cache_dir or '$HF_HUB_CACHE'})") from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise SFTFormatError(f"{where}: cannot download from the Hub ({first_line(exc)})") from None
    return Path(path)


def upload(directory: str | Path, repo_id: str, patterns: Sequence[str], *, revision: str | None = None,
           private: bool | None = None, token: str | bool | None = None, commit_message: str | None = None) -> str:
    """Upload ``directory``'s files matching ``patterns`` to ``repo_id`` (created if missing) in one
    commit; returns the commit's URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=token, library_name="deftx", library_version=__version__)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(folder_path=str(directory), repo_id=repo_id, revision=revision,
                                 allow_patterns=list(patterns),
                                 commit_message=commit_message or f"Upload SFT with deftx {__version__}")
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise SFTFormatError(f"{repo_id}: upload to the Hub failed ({first_line(exc)})") from None
    return str(getattr(info, "commit_url", info))
