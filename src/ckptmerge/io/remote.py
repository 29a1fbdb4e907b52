"""URLs of checkpoints, runs and data that live in object stores (``s3://``, ``gs://``, ``az://``, any fsspec URL).

    url = as_location("s3://bucket/run")      # a Url; a plain path stays a Path
    fs = filesystem(url)                       # the fsspec filesystem, built once per protocol and options
    with remote_errors(url, "list"):           # a backend's exception becomes one line naming URL and fix
        fs.find(url.path, detail=True)

fsspec is the one storage layer; its backends (s3fs, gcsfs, adlfs) are the extras ``ckptmerge[s3]``,
``[gcs]``, ``[azure]``. Credentials come from where each backend reads them (environment, ``~/.aws``,
``AWS_PROFILE``, application-default credentials); ``CKPTMERGE_STORAGE_OPTIONS`` (a JSON object, set by
``--storage-options``) adds keyword arguments such as an ``endpoint_url`` or a ``profile``. Option values never
appear in an error: ``redact`` blanks them out.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ckptmerge.errors import CkptMergeError, MissingExtraError

OPTIONS_ENV = "CKPTMERGE_STORAGE_OPTIONS"
CONCURRENCY_ENV = "CKPTMERGE_IO_CONCURRENCY"
DEFAULT_IO_CONCURRENCY = 8
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure", "abfss": "azure",
          "adl": "azure"}
SHOWN_OPTIONS = frozenset({"endpoint_url", "region_name", "profile", "anon", "use_ssl", "version_aware",
                           "account_name", "project"})  # not secrets
_SECRET_FIELDS = frozenset({"AccountKey", "SharedAccessSignature", "SharedAccessKey"})
_BACKEND_LOGGERS = ("gcsfs", "adlfs", "azure", "s3fs")  # they log a traceback before raising (gcsfs' retries)
_URL_RE = re.compile(r"^(?P<protocol>[a-z][a-z0-9+.-]*)://(?P<path>.*)$")


_NULL_HANDLER = logging.NullHandler()  # (added once: a logger's handlers are a list, the same handler is not re-added)


class RemoteStorageError(CkptMergeError):
    """An object store refused or could not answer: a missing bucket or object, denied access, no endpoint."""


@dataclass(frozen=True)
class Url:
    """A location in an object store: ``protocol://path``. Acts like the few parts of ``Path`` that
    refs, plans and manifests use (``name``, ``parent``, ``/``, ``resolve``) and has no ``__fspath__``, so
    local file code can never open it by mistake."""

    protocol: str
    path: str  # without the protocol and without a trailing slash, as fsspec's methods take it

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> Url:
        return Url(self.protocol, self.path.rsplit("/", 1)[0] if "/" in self.path else self.path)

    @property
    def bucket(self) -> str:
        return self.path.split("/", 1)[0]

    def __truediv__(self, name: str) -> Url:
        return Url(self.protocol, f"{self.path}/{name}")

    def __str__(self) -> str:
        return f"{self.protocol}://{self.path}"

    def resolve(self) -> Url:
        return self

    def is_relative_to(self, other: object) -> bool:
        return isinstance(other, Url) and other.protocol == self.protocol and (
            self.path == other.path or self.path.startswith(other.path + "/"))

    def relative_to(self, other: Url) -> str:
        return self.path[len(other.path):].lstrip("/")


def is_url(location: object) -> bool:
    """True for a ``Url`` or a string ``protocol://...`` (``file://`` included)."""
    return isinstance(location, Url) or (isinstance(location, str) and _URL_RE.match(location) is not None)


def refuse_urls(command: str, works: str, **locations: object) -> None:
    """One line, before any work, when a location given to ``command`` is a URL that it cannot take yet.

    ``locations`` maps each flag or argument name to its value (a path, a URL, None, or a list of them); ``works``
    says what does take URLs today, e.g. ``refuse_urls("watch", "merge s3://... -o OUT reads a run at a URL",
    run_dir=args.run_dir, output=args.output)``. Without this a URL would be read as a local relative path
    (``s3:/bucket/run``), found missing, or worse, created."""
    for name, value in locations.items():
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if item is not None and is_url(item):
                what = name if name.startswith("-") else name.replace("_", " ")
                raise RemoteStorageError(f"{command} {what} {redact(str(item))}: {command} does not take URLs for "
                                         f"this yet (docs/storage.md); {works}")


def as_location(location: str | Path | Url) -> Path | Url:
    """A ``Url`` for ``protocol://...`` (and a ``Url`` as it is), else a ``Path``."""
    if isinstance(location, Url):
        return location
    match = _URL_RE.match(str(location)) if isinstance(location, str) else None
    if match is None:
        return Path(location)
    return Url(match["protocol"], match["path"].rstrip("/"))


def storage_options() -> dict:
    """The extra keyword arguments for every filesystem: ``CKPTMERGE_STORAGE_OPTIONS`` as a JSON object."""
    text = os.environ.get(OPTIONS_ENV, "").strip()
    if not text:
        return {}
    try:
        options = json.loads(text)
    except ValueError:
        options = None
    if not isinstance(options, dict):
        raise RemoteStorageError(f"--storage-options / {OPTIONS_ENV}: not a JSON object; give e.g. "
                                 f"'{{\"endpoint_url\": \"http://localhost:9000\"}}' (value not shown)")
    return options


def io_concurrency() -> int:
    """Byte-range requests in flight per checkpoint (``--io-concurrency``, ``CKPTMERGE_IO_CONCURRENCY``)."""
    text = os.environ.get(CONCURRENCY_ENV, "").strip()
    if not text:
        return DEFAULT_IO_CONCURRENCY
    if not text.isdigit() or int(text) < 1:
        raise RemoteStorageError(f"--io-concurrency / {CONCURRENCY_ENV}: {text[:20]!r} is not a positive integer")
    return int(text)


def filesystem(url: Url):
    """The fsspec filesystem for ``url``'s protocol with the storage options; the extra to install when its
    backend is missing."""
    try:
        import fsspec
    except ImportError:
        raise MissingExtraError(f"{url}: remote storage needs fsspec: pip install 'ckptmerge[{_extra(url.protocol)}]'") from None
    options = storage_options()
    for name in _BACKEND_LOGGERS:  # a failure is our one line; their records reach the application's handlers only
        logging.getLogger(name).addHandler(_NULL_HANDLER)
    try:
        return fsspec.filesystem(url.protocol, **options)
    except ImportError:
        raise MissingExtraError(f"{url}: the {url.protocol}:// backend is not installed: "
                                f"pip install 'ckptmerge[{_extra(url.protocol)}]'") from None
    except ValueError as exc:
        if "not known" in str(exc).lower() or "protocol" in str(exc).lower():
            raise RemoteStorageError(f"{url}: no fsspec filesystem for {url.protocol}:// (known: s3, gs, az, file, "
                                     f"http and the protocols of installed fsspec backends)") from None
        raise RemoteStorageError(f"{url}: bad storage options for {url.protocol}://: {redact(str(exc))[:300]}") from None
    except TypeError as exc:
        raise RemoteStorageError(f"{url}: bad storage options for {url.protocol}:// ({redact(str(exc))[:300]}); "
                                 f"check --storage-options") from None


def _extra(protocol: str) -> str:
    return EXTRAS.get(protocol, "s3")


def redact(text: str) -> str:
    """``text`` with every storage-option value but the endpoint, region and profile (and any ``user:password@`` in
    a URL) blanked out."""
    try:
        values = _option_values(storage_options())
    except RemoteStorageError:
        values = []
    for value in sorted(values, key=len, reverse=True):
        text = text.replace(value, "***")
    return re.sub(r"://[^/@\s]+@", "://***@", text)


def _option_values(options: object) -> list[str]:
    if isinstance(options, dict):
        return [v for key, item in options.items() if key not in SHOWN_OPTIONS for v in _option_values(item)]
    if isinstance(options, (list, tuple)):
        return [v for item in options for v in _option_values(item)]
    text = str(options)
    if len(text) < 4 or isinstance(options, bool):
        return []
    fields = dict(field.split("=", 1) for field in text.split(";") if "=" in field)  # an Azure connection string's
    return [text, *(v for k, v in fields.items() if k.strip() in _SECRET_FIELDS and len(v) >= 4)]  # key alone too


@contextmanager
def remote_errors(url: Url, operation: str) -> Iterator[None]:
    """Turn a backend's exception during ``operation`` (``list``, ``read``, ``write``, ``delete``) on ``url`` into
    one ``RemoteStorageError`` line that names the URL, the bucket, the operation and the fix.

    The backends say the same things differently: a missing bucket is s3fs' ``FileNotFoundError`` naming the
    bucket, gcsfs' ``FileNotFoundError("b/NAME/o")`` and adlfs' ``"No such container"`` (or an empty listing,
    ``RemoteTree.list``); denied access is ``PermissionError`` (s3fs), ``OSError("Forbidden: ...")`` (gcsfs) and
    azure-core's ``ClientAuthenticationError`` / an ``HttpResponseError`` with status 403 (adlfs)."""
    try:
        yield
    except CkptMergeError:
        raise
    except FileNotFoundError as exc:
        if _bucket_missing(url, exc):
            raise RemoteStorageError(missing_bucket_message(url, operation)) from None
        raise RemoteStorageError(f"{url}: not found ({operation}); check the URL") from None
    except Exception as exc:  # connection refused, DNS, timeouts, missing credentials: one line, no secrets
        if _is_denied(exc):
            raise RemoteStorageError(f"{url}: access denied to {operation} in {_bucket_word(url)} {url.bucket!r}; "
                                     f"check the credentials ({CREDENTIALS.get(_extra(url.protocol), 'the backend')}, "
                                     f"--storage-options) and the {_bucket_word(url)}'s policy") from None
        raise RemoteStorageError(f"{url}: cannot {operation} ({_reason(exc)}); check the endpoint "
                                 f"(--storage-options endpoint_url), the network and the credentials") from None


CREDENTIALS = {"s3": "AWS_PROFILE, ~/.aws", "gcs": "GOOGLE_APPLICATION_CREDENTIALS, gcloud auth application-default",
               "azure": "AZURE_STORAGE_CONNECTION_STRING, AZURE_STORAGE_ACCOUNT_KEY, az login"}
_DENIED_CODES = frozenset({"AccessDenied", "AuthorizationFailure", "AuthenticationFailed",
                           "AuthorizationPermissionMismatch", "InsufficientAccountPermissions"})


def missing_bucket_message(url: Url, operation: str) -> str:
    return (f"{url}: {_bucket_word(url)} {url.bucket!r} does not exist ({operation}); check the URL and the endpoint")


def _bucket_word(url: Url) -> str:
    return "container" if _extra(url.protocol) == "azure" else "bucket"


def _is_denied(exc: BaseException) -> bool:
    """403 in any backend's words (401 too: credentials refused)."""
    if isinstance(exc, PermissionError):
        return True
    if isinstance(exc, OSError) and str(exc).startswith("Forbidden"):  # gcsfs' 403
        return True
    if type(exc).__name__ == "ClientAuthenticationError":  # azure-core's 401 / 403
        return True
    status = getattr(exc, "status_code", None) or getattr(exc, "status", None) or getattr(exc, "code", None)
    return status in (401, 403) or getattr(exc, "error_code", None) in _DENIED_CODES


def _bucket_missing(url: Url, exc: FileNotFoundError) -> bool:
    """Whether a FileNotFoundError means the bucket (container) is missing rather than the object: the backend's
    words where it says so, else one existence check of the bucket (an error path only)."""
    text = str(exc).lower()
    if ("bucket" in text and "does not exist" in text) or "no such container" in text or "nosuchbucket" in text:
        return True
    return bucket_exists(url) is False


def bucket_exists(url: Url) -> bool | None:
    """True or False when the store says whether ``url``'s bucket exists; None when it cannot tell (denied, down)."""
    try:
        fs = filesystem(url)
        fs.invalidate_cache(url.bucket)
        return bool(fs.exists(url.bucket))
    except Exception:  # noqa: BLE001 - an answer of "cannot tell": the caller keeps its own message
        return None


def _reason(exc: BaseException) -> str:
    name = type(exc).__name__
    if "Credentials" in name:
        return "no credentials found"
    first = str(exc).splitlines()[0] if str(exc) else ""
    return redact(f"{name}: {first}")[:300]
