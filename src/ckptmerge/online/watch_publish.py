"""``ckptmerge watch RUN -o s3://bucket/out``: a watch that publishes its outputs to an object store.

An object store cannot be appended to, renamed in or hard-linked, so the watch works in a local folder (``--work-dir``,
by default ``$CKPTMERGE_CACHE/watch/<hash of the URL>``): its state, the running EMAs' fp32 states, retained
checkpoints and the trackers' files live there, exactly as in a local ``-o`` folder. What it rewrites there is then
published:

- ``<method>/`` -> ``URL/<method>/`` by the commit protocol of ``io/remote_publish.py`` (uploaded under a hidden
  temporary prefix, marked, copied in by the server with ``merge.json`` and ``config.json`` last), so a reader
  never sees a folder that looks complete but is not;
- ``watch.jsonl`` (and the ``--report`` files) -> one PUT each, which an object store applies atomically.

The watch state records what was published (``WatchState.published``: the step a folder holds, the sha256 of a
file), so a watch killed between a local rewrite and its upload publishes it when restarted.

    check_output(url, work_dir)               # before any work: bucket, listing, write and delete; leftovers
    publish(url, work_dir, item)              # one Publication: a folder or a file
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from ckptmerge.errors import ConfigError
from ckptmerge.io.publish import temp_name
from ckptmerge.io.remote import Url, filesystem, redact, remote_errors, storage_options
from ckptmerge.io.remote_publish import clean_remote, commit_upload
from ckptmerge.online.watch_state import STATE_FILE, WatchState

PROBE = "watch-probe"


@dataclass(frozen=True)
class Publication:
    """One thing to bring ``URL`` level with the working folder: a folder (``version`` = the step it holds) or a
    file (``version`` = the sha256 of ``data``)."""

    name: str
    version: int | str
    data: bytes | None = None  # a file's bytes; None for a folder of the working folder

    @classmethod
    def file(cls, name: str, data: bytes) -> Publication:
        return cls(name, f"sha256:{hashlib.sha256(data).hexdigest()}", data)


def default_work_dir(url: Url) -> Path:
    """``$CKPTMERGE_CACHE/watch/<hash>`` (else ``$XDG_CACHE_HOME/ckptmerge``, else ``~/.cache/ckptmerge``): one folder
    per URL and endpoint, so restarting the same command finds its state again."""
    root = os.environ.get("CKPTMERGE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ckptmerge"
    endpoint = str(storage_options().get("endpoint_url", ""))  # not a secret (io/remote.py SHOWN_OPTIONS)
    digest = hashlib.sha256(f"{url}\n{endpoint}".encode()).hexdigest()[:12]
    return Path(root) / "watch" / digest


def work_dir_for(output: Url | Path, given: str | None) -> Path:
    """The local folder a watch works in: ``output`` itself when local, else ``--work-dir`` or the default."""
    if not isinstance(output, Url):
        if given is not None:
            raise ConfigError(f"--work-dir {given}: only for an -o URL; a local -o folder is its own working folder")
        return Path(output)
    return Path(given) if given is not None else default_work_dir(output)


def check_output(url: Url, work_dir: Path) -> list[str]:
    """Before any work: finish or remove what killed uploads left under ``url`` (``clean_remote``), then check that
    the bucket exists and ``url`` can be listed, written and deleted in (a probe object under a hidden temporary
    name). Refuses a ``url`` that holds objects when ``work_dir`` has no watch state: they are not this watch's.
    Returns the lines of what was cleaned."""
    fs = filesystem(url)
    with remote_errors(url, "list"):
        fs.invalidate_cache(url.path)
        try:
            keys = [k for k in fs.find(url.path) if k.startswith(url.path + "/")]
        except FileNotFoundError as exc:
            if "bucket" in str(exc).lower():
                raise
            keys = []
    hidden = [k for k in keys if "/." in k[len(url.path):]]  # temporaries of killed uploads (``.<name>.tmp-*``)
    cleaned = clean_remote(url) if hidden else []
    probe = url / temp_name(PROBE) / "probe"
    with remote_errors(url, "write"):
        fs.pipe_file(probe.path, b"")
    with remote_errors(url, "delete"):
        fs.rm_file(probe.path)
    ours = [k for k in keys if not k[len(url.path):].lstrip("/").startswith(".")]
    if ours and not (work_dir / STATE_FILE).exists():
        raise ConfigError(f"{redact(str(url))}: holds {len(ours)} object(s) but the working folder {work_dir} has no "
                          f"watch state for it; pass the --work-dir of the watch that wrote them, or delete them first "
                          f"(a watch publishes only where it keeps its state)")
    return cleaned


def stale(state: WatchState, wanted: list[Publication]) -> list[Publication]:
    """What ``url`` does not hold yet, as the state records it."""
    return [item for item in wanted if state.published.get(item.name) != item.version]


def publish(url: Url, work_dir: Path, item: Publication) -> None:
    """Publish one item: a file by one PUT, a folder by the commit protocol (replacing the one there)."""
    if item.data is None:
        commit_upload(work_dir / item.name, url / item.name, force=True)
        return
    with remote_errors(url / item.name, "write"):
        filesystem(url).pipe_file((url / item.name).path, item.data)

