"""``torch.distributed.checkpoint`` folders at a URL (torchtitan and OLMo-core write them straight to buckets),
read by range requests: ``DcpReader``'s rules with the bytes fetched from the store.

    reader = RemoteDcpReader(tree, Url("s3", "bucket/run/step-1000"))   # tree: the folder's one listing

``.metadata`` is fetched in one request and parsed by the restricted unpickler, as locally; each tensor chunk is one
range request ``[offset, offset + length)`` of its ``.distcp`` object, unpickled with ``weights_only=True``. A data
file the metadata names must be a plain relative name of an object in the folder's listing.
"""

from __future__ import annotations

import posixpath

from ckptmerge.errors import CheckpointFormatError
from ckptmerge.io.dcp_checks import checked_storage
from ckptmerge.io.dcp_reader import METADATA_FILE, DcpReader, parse_dcp_metadata
from ckptmerge.io.remote import Url, remote_errors
from ckptmerge.io.remote_tree import RemoteTree


class RemoteDcpReader(DcpReader):
    """The model tensors of the DCP folder at ``url``, ``tree`` its listing (keys relative to ``url``)."""

    def __init__(self, tree: RemoteTree, url: Url):
        self._tree = tree
        super().__init__(url)

    def _load_metadata(self) -> object:
        return parse_dcp_metadata(self._tree.url(METADATA_FILE), self._tree.read_bytes(METADATA_FILE))

    def _checked_storage(self, meta_path, index: object, sinfo: object):
        return checked_storage(self.path, meta_path, index, sinfo, confine=self._confine)

    def _confine(self, folder: Url, name: object, *, named_by: Url) -> Url:
        if not isinstance(name, str) or not name or "\x00" in name or "\\" in name:
            raise CheckpointFormatError(f"{named_by}: names a file as {str(name)[:200]!r}, which is not a file name; "
                                        f"the file is corrupt. Re-export the checkpoint.")
        key = posixpath.normpath(name)
        if name.startswith("/") or key.startswith("..") or "://" in name:
            raise CheckpointFormatError(f"{named_by}: names {name[:200]!r}, which is outside the checkpoint folder "
                                        f"{folder}; ckptmerge only reads files inside the folder.")
        if not self._tree.is_file(key):
            raise CheckpointFormatError(f"{named_by}: names {key!r}, which is not in {folder} (incomplete upload? a "
                                        f"rank's .distcp object missing); upload it or re-save the checkpoint")
        return self._tree.url(key)

    def _read_range(self, file: Url, start: int, length: int) -> bytes:
        if length == 0:
            return b""
        with remote_errors(file, "read"):
            data = self._tree.fs.cat_file(file.path, start=start, end=start + length)
        if len(data) != length:
            raise CheckpointFormatError(f"{file}: {len(data)} bytes where the DCP metadata promises {length} at offset "
                                        f"{start}; the object is truncated or was replaced. Re-upload the checkpoint.")
        return data
