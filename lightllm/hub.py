"""Hugging Face hub ids wherever lightllm takes a folder (a model, a quantized checkpoint, an adapter).

:func:`resolve_folder` is the one place that turns what the user passed into a local folder: a
folder that exists is used as it is; anything else that reads as a hub id (``org/name``) is fetched
with ``huggingface_hub.snapshot_download`` at ``revision`` (a branch, tag or commit; default
``main``), which serves it from the local cache without a request when ``HF_HUB_OFFLINE=1`` (or
``local_files_only``) and downloads it otherwise; ``subfolder`` then picks a folder inside the
snapshot (repositories that hold several variants of a model). The cache is huggingface_hub's own
(``HF_HOME`` / ``HF_HUB_CACHE``), so what transformers downloaded is reused and the other way round.

Everything downstream (``load_model``, ``load_quantized``, ``lightllm.tuning.from_pretrained``, the
CLI's ``--model`` / ``--adapter``) reads the resolved folder as before.
"""

from __future__ import annotations

import logging
import os
import pathlib
from typing import Iterable

logger = logging.getLogger(__name__)

# Small root-level files fetched beside a subfolder: a repository that keeps variants in subfolders
# usually keeps the tokenizer at its root (load_model falls back to it).
ROOT_SIDE_FILES = ("*.json", "*.txt", "*.model", "*.jinja")


def _subfolder_parts(subfolder: str) -> tuple[str, ...]:
    parts = tuple(p for p in subfolder.replace("\\", "/").split("/") if p not in ("", "."))
    if not parts or subfolder.startswith(("/", "\\")) or ".." in parts:
        raise ValueError(f"subfolder {subfolder!r} must be a relative path inside the folder or repository "
                         "(no '..', not absolute, not empty)")
    return parts


def looks_like_hub_id(name: str) -> bool:
    """``name`` has the shape of a hub repository id ("name" or "org/name", hub's characters only)."""
    if not name or name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name or os.sep in name.replace("/", ""):
        return False
    try:
        from huggingface_hub.utils import validate_repo_id
    except ImportError:  # huggingface_hub is not installed: resolve_folder says which extra brings it
        return "/" in name or name.replace("-", "").replace("_", "").replace(".", "").isalnum()
    try:
        validate_repo_id(name)
    except Exception:  # HFValidationError; its base class moved between huggingface_hub releases
        return False
    return True


def resolve_folder(name_or_path, revision: str | None = None, subfolder: str | None = None, *,
                   what: str = "model", allow_patterns: Iterable[str] | None = None) -> pathlib.Path:
    """The local folder for ``name_or_path``: an existing folder (joined with ``subfolder``), or a
    Hugging Face hub id fetched through ``huggingface_hub.snapshot_download(revision=...)`` (from the
    cache alone under ``HF_HUB_OFFLINE=1``), joined with ``subfolder``.

    ``what`` names the thing in error messages ("model", "checkpoint", "adapter"). Raises
    FileNotFoundError naming the id, the revision and the cache when the id cannot be had (not in the
    cache while offline, not on the hub), or when ``subfolder`` is not there; ValueError for a
    ``revision`` given with a local folder (a folder has no revisions) or an unusable ``subfolder``.
    """
    parts = _subfolder_parts(subfolder) if subfolder is not None else ()
    path = pathlib.Path(os.fspath(name_or_path)).expanduser()
    if path.is_dir():
        if revision is not None:
            raise ValueError(f"{what} {str(name_or_path)!r} is a local folder; revision={revision!r} applies to "
                             "Hugging Face hub ids only")
        return _join(path, parts, f"{what} folder {str(path)!r}")
    name = os.fspath(name_or_path)
    if isinstance(name, bytes) or not looks_like_hub_id(name):
        raise FileNotFoundError(f"{what} {str(name_or_path)!r} does not exist (neither a folder nor a Hugging Face "
                                "hub id)")

    from ._extras import require

    hub = require("huggingface_hub", f"loading the {what} {name!r} from the Hugging Face hub")
    from huggingface_hub import constants, errors

    patterns = list(allow_patterns) if allow_patterns is not None else None
    if parts and patterns is None:
        patterns = ["/".join(parts) + "/*", *ROOT_SIDE_FILES]
    offline = bool(constants.HF_HUB_OFFLINE)
    rev = revision or "main"
    where = f"{what} {name!r} (revision {rev!r})"
    try:
        snapshot = hub.snapshot_download(name, revision=revision, allow_patterns=patterns, local_files_only=offline)
    except errors.LocalEntryNotFoundError as exc:
        cache = constants.HF_HUB_CACHE
        reason = ("HF_HUB_OFFLINE is set, so it is not downloaded" if offline
                  else "and the hub could not be reached to download it")
        raise FileNotFoundError(f"{where} is not a local folder, and that hub id and revision are not in the "
                                f"Hugging Face cache ({cache}); {reason}") from exc
    except errors.RevisionNotFoundError as exc:
        raise FileNotFoundError(f"{where}: the hub repository has no such revision") from exc
    except (errors.RepositoryNotFoundError, errors.GatedRepoError) as exc:
        raise FileNotFoundError(f"{where} is not a local folder, and the hub has no such repository, or it is "
                                f"private or gated and no valid token was given ({type(exc).__name__})") from exc
    folder = pathlib.Path(snapshot)
    logger.debug("%s resolved to %s", where, folder)
    return _join(folder, parts, where)


def _join(folder: pathlib.Path, parts: tuple[str, ...], where: str) -> pathlib.Path:
    if not parts:
        return folder
    path = folder.joinpath(*parts)
    if not path.is_dir():
        raise FileNotFoundError(f"{where} has no subfolder {'/'.join(parts)!r}")
    return path


def repo_root(folder: pathlib.Path, subfolder: str | None) -> pathlib.Path:
    """The folder ``subfolder`` was resolved inside (itself when there is no subfolder)."""
    folder = pathlib.Path(folder)
    for _ in _subfolder_parts(subfolder) if subfolder is not None else ():
        folder = folder.parent
    return folder


__all__ = ["looks_like_hub_id", "repo_root", "resolve_folder"]
