"""OpenAI's CLIP weights, fetched on first use as OpenAI's ``clip.load`` does.

The weights of a named architecture live in the cache folder (``~/.cache/clip/<name>.pt``).
When the file is missing, or its SHA-256 is not OpenAI's, it is downloaded from OpenAI's URL,
whose second-to-last path segment is the file's SHA-256:

* the bytes go to ``<name>.pt.part``; a transfer that breaks off is resumed from there with
  an HTTP Range request (:data:`ATTEMPTS` times in one run, then by the next run);
* the finished file is checked against the SHA-256 and only then renamed to ``<name>.pt``,
  so the cache never holds half a file; a file with a wrong checksum is deleted;
* one process downloads at a time (a lock file beside it), so the ranks of a multi-GPU run
  wait for the first one instead of writing into the same file;
* a progress bar is drawn on a terminal only (``utils.progress``);
* ``SVLLREID_OFFLINE=1`` forbids the download: a missing file is one line giving the URL,
  the path, the checksum and how to copy the file by hand.

The standard library (urllib) does the transfer.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from utils.errors import ConfigError, UserError
from utils.progress import progress_enabled
from utils.yesno import is_yes

__all__ = ["OPENAI_URLS", "OFFLINE_ENV", "ATTEMPTS", "offline", "expected_sha256", "hand_copy_hint",
           "sha256_of", "fetch_openai_weights"]

logger = logging.getLogger("svllreid.clip")

_BASE = "https://openaipublic.azureedge.net/clip/models"
# OpenAI's release of the architectures this project builds; the SHA-256 is the segment before the name.
OPENAI_URLS: dict[str, str] = {
    "RN50": f"{_BASE}/afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762/RN50.pt",
    "ViT-B-16": f"{_BASE}/5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
}
OFFLINE_ENV = "SVLLREID_OFFLINE"
ATTEMPTS = 3        # transfers in one run; each one after a break resumes from the bytes received
TIMEOUT_S = 60      # seconds without an answer or a byte before a transfer counts as broken
_CHUNK = 1 << 20


class _BrokenOff(Exception):
    """The transfer stopped before the end of the file (resumable)."""


class _Failed(Exception):
    """No transfer: the server refused, answered an error or could not be reached."""


def offline() -> bool:
    """Whether ``SVLLREID_OFFLINE`` forbids downloads (1 / yes / on / true); unset or 0 allows them."""
    value = os.environ.get(OFFLINE_ENV, "").strip()
    if value in ("", "0"):
        return False
    if value == "1":
        return True
    try:
        return is_yes(value)
    except ValueError:
        raise ConfigError(f"{OFFLINE_ENV} = {value!r} is not allowed; 1 never downloads CLIP weights, "
                          "0 (or unset) downloads them on first use") from None


def expected_sha256(url: str) -> str:
    """The SHA-256 written in an OpenAI CLIP URL (the path segment before the file name)."""
    return url.rsplit("/", 2)[-2]


def hand_copy_hint(url: str, path: Path) -> str:
    """How to put the file at ``path`` by hand: the URL, a curl command and the checksum to check."""
    return (f"copy the file by hand: on a machine with internet run curl -fL -o {path.name} {url} ; check that "
            f"sha256sum {path.name} prints {expected_sha256(url)} ; put the file at {path} "
            "(or set MODEL.PRETRAIN_PATH to it)")


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of the file at ``path``."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def fetch_openai_weights(name: str, path: Path) -> Path:
    """``path``, holding OpenAI's weights of architecture ``name`` with their SHA-256.

    A verified file is used as it is; otherwise it is downloaded (see the module docstring),
    unless ``SVLLREID_OFFLINE`` forbids it: then a missing file is ``FileNotFoundError`` and a
    wrong one ``UserError``, each one line saying how to copy the file by hand.
    """
    url = OPENAI_URLS[name]
    sha = expected_sha256(url)
    if _verified(path, sha):
        return path
    if offline():
        if path.is_file():
            raise UserError(f"{path} has SHA-256 {sha256_of(path)}, not that of OpenAI's {name} weights ({sha}): "
                            f"a cut-off copy or another file, and {OFFLINE_ENV}=1 forbids downloading it again; "
                            f"{hand_copy_hint(url, path)}")
        raise FileNotFoundError(f"CLIP weights {name} are not at {path}, and {OFFLINE_ENV}=1 forbids downloading "
                                f"them; {hand_copy_hint(url, path)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(path):
        if _verified(path, sha):      # another process finished the download while this one waited
            return path
        if path.is_file():
            logger.warning("%s has SHA-256 %s, not that of OpenAI's %s weights (%s): downloading them again",
                           path, sha256_of(path), name, sha)
        _download(url, path, sha)
    return path


def _verified(path: Path, sha: str) -> bool:
    return path.is_file() and sha256_of(path) == sha


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """Hold the lock file beside ``path`` (waiting for a process that holds it); the kernel frees it
    when the file is closed or the process ends, so a killed download leaves no stale lock."""
    with open(path.with_name(f".{path.name}.lock"), "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("Another process is downloading %s; waiting for it", path)
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _download(url: str, path: Path, sha: str) -> None:
    """Transfer ``url`` into ``path``.part (resuming what is there), check it, rename it to ``path``."""
    part = path.with_name(path.name + ".part")
    logger.info("Downloading the CLIP weights %s to %s", url, path)
    for attempt in range(1, ATTEMPTS + 1):
        try:
            _transfer(url, part, path.name)
            break
        except _Failed as e:
            raise UserError(f"cannot download the CLIP weights from {url}: {e}; {hand_copy_hint(url, path)}") from None
        except _BrokenOff as e:
            received = part.stat().st_size if part.is_file() else 0
            if attempt == ATTEMPTS:
                raise UserError(f"the download of {url} broke off {ATTEMPTS} times ({e}); the {received} bytes "
                                f"received are kept in {part} and the next run resumes from there; "
                                f"{hand_copy_hint(url, path)}") from None
            logger.warning("The download of %s broke off after %d bytes (%s); resuming", url, received, e)
    found = sha256_of(part)
    if found != sha:
        part.unlink()
        raise UserError(f"the file downloaded from {url} has SHA-256 {found}, not {sha}; it was deleted: run again "
                        f"to download it again, or {hand_copy_hint(url, path)}")
    os.replace(part, path)
    logger.info("CLIP weights verified (SHA-256 %s) and saved to %s", sha, path)


def _reason(e: BaseException) -> str:
    """An OS or URL error as words (``Connection refused``, not ``<urlopen error [Errno 111] ...>``)."""
    reason = getattr(e, "reason", e)
    return getattr(reason, "strerror", None) or str(reason) or type(reason).__name__


def _transfer(url: str, part: Path, name: str) -> None:
    """Append the rest of ``url`` to ``part`` (from its size, with a Range request); the whole file
    when ``part`` is absent or the server ignores the range."""
    offset = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:      # range not satisfiable: the part already holds the whole file
            return
        raise _Failed(f"the server answered HTTP {e.code} {e.reason}") from None
    except (OSError, http.client.HTTPException) as e:     # URLError (no route, refused, DNS), timeouts
        raise _Failed(_reason(e)) from None
    with response:
        if offset and response.status != 206:
            offset = 0                    # the server sends the whole file: start again
        elif offset and not response.headers.get("Content-Range", "").startswith(f"bytes {offset}-"):
            raise _Failed(f"the server answered the request for bytes {offset}- with "
                          f"{response.headers.get('Content-Range')!r}")
        length = response.headers.get("Content-Length", "")
        total = offset + int(length) if length.isdigit() else None
        bar = tqdm(total=total, initial=offset, desc=name, unit="B", unit_scale=True, unit_divisor=1024,
                   leave=False, dynamic_ncols=True, disable=not progress_enabled())
        with bar, open(part, "ab" if offset else "wb") as f:
            try:
                while chunk := response.read(_CHUNK):
                    f.write(chunk)
                    bar.update(len(chunk))
            except (OSError, http.client.HTTPException) as e:     # reset, timeout, IncompleteRead
                raise _BrokenOff(_reason(e)) from None
            f.flush()
            os.fsync(f.fileno())
        if total is not None and part.stat().st_size < total:
            raise _BrokenOff(f"the connection closed at {part.stat().st_size} of {total} bytes")
