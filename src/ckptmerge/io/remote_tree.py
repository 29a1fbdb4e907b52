"""One listing of everything under a URL, taken once and asked many questions (``is_file``, ``children``, sizes).

    tree = RemoteTree.list(Url("s3", "bucket/run"))    # one recursive listing: a few paginated LIST calls
    tree.children("")            # ["checkpoint-100", "checkpoint-200", "config.json"]
    tree.object("checkpoint-100/model.safetensors")    # RemoteObject(url, size, version)
    tree.read_bytes("checkpoint-100/trainer_state.json")

Discovery, layout detection and the readers all work from this snapshot: no HEAD request per file.
Each object's ``version`` (ETag, GCS generation, else size and modification time) is what a merge pins:
listing again after the merge and finding another version means the object changed while it was read.
"""

from __future__ import annotations

from dataclasses import dataclass

from ckptmerge.io.remote import (
    RemoteStorageError,
    Url,
    bucket_exists,
    filesystem,
    missing_bucket_message,
    remote_errors,
)

MAX_SMALL_FILE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class RemoteObject:
    """One object: where it is, how many bytes, and which version of it was listed."""

    url: Url
    size: int
    version: str


class RemoteTree:
    """The objects under ``root`` (keys relative to it, ``/``-separated) as one listing found them."""

    def __init__(self, root: Url, fs, objects: dict[str, RemoteObject]):
        self.root, self.fs, self.objects = root, fs, objects

    @classmethod
    def list(cls, root: Url) -> RemoteTree:
        """List ``root`` recursively (a single object when ``root`` is one file)."""
        fs = filesystem(root)
        with remote_errors(root, "list"):
            fs.invalidate_cache(root.path)  # a fresh listing: versions are compared against earlier ones
            found = fs.find(root.path, detail=True)
        if not found and bucket_exists(root) is False:  # adlfs lists a missing container as empty
            raise RemoteStorageError(missing_bucket_message(root, "list"))
        objects = {}
        for key, info in found.items():
            if info.get("type", "file") != "file":
                continue
            key = key.split("://", 1)[-1].rstrip("/")
            rel = "" if key == root.path else key[len(root.path):].lstrip("/")
            if key != root.path and not key.startswith(root.path + "/"):
                continue
            objects[rel] = RemoteObject(Url(root.protocol, key), int(info.get("size") or 0), _version(info))
        return cls(root, fs, objects)

    def exists(self) -> bool:
        return bool(self.objects)

    def is_file(self, rel: str) -> bool:
        return rel in self.objects

    def is_dir(self, rel: str) -> bool:
        prefix = f"{rel}/" if rel else ""
        return any(key.startswith(prefix) and key != rel for key in self.objects) and rel not in self.objects

    def object(self, rel: str) -> RemoteObject:
        return self.objects[rel]

    def url(self, rel: str) -> Url:
        return self.root / rel if rel else self.root

    def children(self, rel: str = "") -> list[str]:
        """Names of the files and folders directly inside folder ``rel``, sorted."""
        prefix = f"{rel}/" if rel else ""
        return sorted({key[len(prefix):].split("/", 1)[0] for key in self.objects
                       if key.startswith(prefix) and key != rel})

    def under(self, rel: str) -> dict[str, RemoteObject]:
        """Every object inside folder ``rel`` (or the object ``rel`` itself), by its key."""
        prefix = f"{rel}/" if rel else ""
        return {key: obj for key, obj in self.objects.items() if key == rel or key.startswith(prefix)}

    def read_bytes(self, rel: str) -> bytes:
        """A small file's bytes (metadata, an index, a tokenizer), in one request."""
        obj = self.objects[rel]
        if obj.size > MAX_SMALL_FILE_BYTES:
            raise ValueError(f"{obj.url}: {obj.size} bytes is too large to read as metadata")
        with remote_errors(obj.url, "read"):
            return self.fs.cat_file(obj.url.path)


def _version(info: dict) -> str:
    """What identifies this version of an object: its generation on GCS (gcsfs lists an ``etag`` too, but GCS
    changes it on metadata updates, and an emulator makes it the MD5), else its ETag (S3, Azure), else size and
    time."""
    for key in ("generation", "ETag", "etag", "version_id", "VersionId"):
        if info.get(key):
            return f"{key.lower()}:{str(info[key]).strip(chr(34))}"
    when = info.get("LastModified") or info.get("mtime") or info.get("last_modified") or info.get("updated") or ""
    return f"size:{info.get('size')}:time:{when}"
