"""Downloads of published weights: Hugging Face hub files through ``huggingface_hub`` (its cache, ``HF_ENDPOINT``,
``HF_HUB_OFFLINE`` and its progress bar), plain URLs through one small downloader (a resumable ``.part`` file,
atomic rename, redirects followed). Every file is checked against the sha256 the server announces and a pinned one
when there is one: a file that does not match is deleted, so that it is never served from the cache.

Nothing here prints. Failures are ``DownloadError`` (a ``CheckpointError``) with the URL in the message.
"""
from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from ..errors import CheckpointError
from .io import atomic_write

Progress = Callable[[int, "int | None", str], None]
"""``progress(bytes done, bytes in all or None, file name)``, called as a plain-URL download advances."""

SHA256 = re.compile(r"^[0-9a-f]{64}$")
CHUNK = 1 << 20


class DownloadError(CheckpointError, OSError):
    """A download that failed: unreachable, offline, refused by the server, cut short, or a hash mismatch."""


def sha256_of(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, as 64 lower-case hex digits."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def check_sha256(path: Path, expected: dict[str, str | None], url: str) -> None:
    """Compare ``path``'s sha256 with each expected one (``{where it comes from: hex or None}``); on a mismatch
    delete the file and raise ``DownloadError`` naming both hashes."""
    wanted = {k: v.lower() for k, v in expected.items() if v}
    if not wanted:
        return
    found = sha256_of(path)
    for where, value in wanted.items():
        if found != value:
            path.unlink(missing_ok=True)
            raise DownloadError(f"{url}: the file's sha256 is {found}, but {where} is {value}; the file was deleted "
                                "(a changed or corrupted download); try again, and report it if it persists")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_settings() -> dict:
    """What ``hf_download`` passes to ``huggingface_hub``, read now from the environment (``HF_ENDPOINT``,
    ``HF_HUB_OFFLINE``, ``HF_HUB_CACHE``) so that a setting made after ``huggingface_hub`` was imported holds too;
    ``None``: huggingface_hub's own value."""
    from huggingface_hub import constants
    endpoint = os.environ.get("HF_ENDPOINT", "").rstrip("/") or None
    return {"endpoint": endpoint, "offline": bool(constants.HF_HUB_OFFLINE) or _env_flag("HF_HUB_OFFLINE"),
            "cache_dir": os.environ.get("HF_HUB_CACHE") or None}


def hub_url(repo_id: str, filename: str, revision: str = "main") -> str:
    """The URL ``hf_download`` fetches (on ``HF_ENDPOINT`` when it is set)."""
    from huggingface_hub import hf_hub_url
    return hf_hub_url(repo_id, filename, revision=revision, endpoint=hub_settings()["endpoint"])


def hf_download(repo_id: str, filename: str, revision: str = "main", sha256: str | None = None,
                tqdm_class=None) -> Path:
    """``filename`` of the hub repo ``repo_id`` through ``huggingface_hub``'s cache (a second call does not download
    again), checked against the sha256 the hub announced for it (its ``X-Linked-Etag``, the name of the cached
    blob) and against ``sha256`` when given. A mismatching file is removed from the cache and refused.
    Raises ``DownloadError`` (offline and not cached, unreachable, missing on the hub, hash mismatch)."""
    import huggingface_hub

    from ..version import __version__
    settings = hub_settings()
    url = hub_url(repo_id, filename, revision)
    try:
        extra = {"tqdm_class": tqdm_class} if tqdm_class is not None else {}
        path = Path(huggingface_hub.hf_hub_download(
            repo_id, filename, revision=revision, endpoint=settings["endpoint"], cache_dir=settings["cache_dir"],
            local_files_only=settings["offline"], library_name="edgevits", library_version=__version__, **extra))
    except _network_errors() as e:
        raise DownloadError(f"could not download {url}: {_hub_reason(e, settings['offline'])}") from None
    blob = path.resolve()
    announced = blob.name if SHA256.match(blob.name) else None  # an LFS file's blob is named by its sha256
    try:
        check_sha256(blob, {"the sha256 the hub announced": announced, "the pinned sha256": sha256}, url)
    except DownloadError:
        if path.is_symlink():
            path.unlink()  # the snapshot's link to the deleted blob: the next call downloads again
        raise
    return path


def _network_errors() -> tuple[type, ...]:
    """What huggingface_hub and its HTTP client raise when a file cannot be had (all ``OSError`` or
    ``ValueError`` in huggingface_hub, the client's own ``HTTPError`` / ``InvalidURL`` otherwise)."""
    import importlib
    errors: tuple[type, ...] = (OSError, ValueError)
    for name in ("httpx2", "httpx"):
        try:
            client = importlib.import_module(name)
        except ImportError:
            continue
        errors += tuple(getattr(client, n) for n in ("HTTPError", "InvalidURL") if hasattr(client, n))
    return errors


def _hub_reason(e: BaseException, offline: bool) -> str:
    """Why a hub download failed, in one line."""
    from huggingface_hub.errors import LocalEntryNotFoundError
    if offline:
        return "offline (HF_HUB_OFFLINE is set) and not in huggingface_hub's cache"
    if isinstance(e, LocalEntryNotFoundError):
        cause = f" ({_reason(e.__cause__)})" if e.__cause__ is not None else ""
        return f"the hub could not be reached{cause} and the file is not in huggingface_hub's cache"
    return _reason(e)


def _reason(e: BaseException) -> str:
    """A short, one-line reason for a failed request."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    status = getattr(getattr(e, "response", None), "status_code", None)
    if status == 404:
        return "not found on the server (HTTP 404)"
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


# ---- plain URLs ----------------------------------------------------------------------------------------------------

def announced_sha256(headers) -> str | None:
    """The sha256 a server announces for the whole file: ``Repr-Digest: sha-256=:<base64>:`` (RFC 9530),
    ``Digest: SHA-256=<base64>`` (RFC 3230) or the hub's ``X-Linked-Etag``; None when it announces none."""
    linked = re.sub(r'^W/', "", headers.get("X-Linked-Etag") or "").strip('"').lower()
    if SHA256.match(linked):
        return linked
    for name in ("Repr-Digest", "Digest"):
        m = re.search(r"sha-256=:?([A-Za-z0-9+/=]+):?", headers.get(name) or "", re.IGNORECASE)
        if m:
            try:
                return base64.b64decode(m.group(1)).hex()
            except ValueError:
                return None
    return None


def url_download(url: str, dest: str | os.PathLike, sha256: str | None = None, progress: Progress | None = None,
                 timeout: float = 30.0) -> Path:
    """Download ``url`` to ``dest`` (redirects followed) and return ``dest``. A file already at ``dest`` is used as
    it is (checked against ``sha256`` when given). The bytes go to ``dest + '.part'`` first: a download cut short
    keeps it, and the next call asks for the rest (an HTTP Range request, with ``If-Range`` so that a file changed
    on the server starts over). The finished file is checked against the sha256 the server announced and
    ``sha256`` (a mismatch deletes it), then renamed to ``dest`` in one step. ``progress`` is called as bytes arrive
    (default: huggingface_hub's progress bar). Raises ``DownloadError``."""
    dest = Path(dest)
    if dest.is_file():
        check_sha256(dest, {"the pinned sha256": sha256}, url)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part, state_path = dest.with_name(dest.name + ".part"), dest.with_name(dest.name + ".part.json")
    state = _read_state(state_path, url) if part.is_file() else {}
    announced = _fetch(url, part, state, state_path, progress, timeout)
    try:
        check_sha256(part, {"the sha256 the server announced": announced, "the pinned sha256": sha256}, url)
    except DownloadError:
        state_path.unlink(missing_ok=True)
        raise
    os.replace(part, dest)
    state_path.unlink(missing_ok=True)
    return dest


def _read_state(path: Path, url: str) -> dict:
    """What the interrupted download of ``url`` recorded (validator, announced sha256); {} if it was another."""
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return state if state.get("url") == url else {}


def _fetch(url: str, part: Path, state: dict, state_path: Path, progress: Progress | None, timeout: float):
    """Append the rest of ``url`` to ``part`` (all of it when the server ignores the range); returns the sha256
    the server announced, if any."""
    from ..version import __version__
    have = part.stat().st_size if part.is_file() and state else 0
    headers = {"User-Agent": f"edgevits/{__version__}", "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
        if state.get("validator"):
            headers["If-Range"] = state["validator"]
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the part is not a prefix of the file any more: start over
            part.unlink(missing_ok=True)
            return _fetch(url, part, {}, state_path, progress, timeout)
        raise DownloadError(f"could not download {url}: the server answered HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise DownloadError(f"could not download {url}: {_reason(getattr(e, 'reason', e))}") from None
    with response:
        resumed = response.status == 206
        if resumed and not re.match(rf"bytes {have}-", response.headers.get("Content-Range") or ""):
            part.unlink(missing_ok=True)  # another range than the one asked for: start over
            return _fetch(url, part, {}, state_path, progress, timeout)
        done = have if resumed else 0
        length = response.headers.get("Content-Length")
        total = done + int(length) if length and length.isdigit() else None
        announced = announced_sha256(response.headers) or (state.get("sha256") if resumed else None)
        validator = response.headers.get("ETag") or response.headers.get("Last-Modified")
        text = json.dumps({"url": url, "validator": validator, "sha256": announced})
        atomic_write(state_path, lambda tmp: Path(tmp).write_text(text))
        done = _copy(response, part, "ab" if resumed else "wb", done, total, progress)
    if total is not None and done != total:
        raise DownloadError(f"could not download {url}: the connection ended after {done} of {total} bytes; the "
                            f"{done} bytes are kept in {part} and the next call resumes from there")
    return announced


def _copy(response, part: Path, mode: str, done: int, total: int | None, progress: Progress | None) -> int:
    """Stream ``response`` into ``part``; returns the bytes the file holds. A connection that breaks leaves what
    arrived in ``part``."""
    bar = None
    if progress is None:
        from huggingface_hub.utils import tqdm
        bar = tqdm(total=total, initial=done, unit="B", unit_scale=True, unit_divisor=1024, desc=part.name[:-5])
        progress = lambda d, t, name: bar.update(d - bar.n)  # noqa: E731
    try:
        with open(part, mode) as f:
            while True:
                try:
                    block = response.read(CHUNK)
                except (OSError, ValueError, http.client.HTTPException):  # the connection broke: keep what arrived
                    break
                if not block:
                    break
                f.write(block)
                done += len(block)
                progress(done, total, part.name[:-5])
    finally:
        if bar is not None:
            bar.close()
    return done
