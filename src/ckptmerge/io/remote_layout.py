"""Checkpoints at a URL, told from one listing (``io/remote_tree.py``): the plain formats by the local rules of
``io/layout.py``, the trainers' layouts (``io/layouts/``) by their own modules run on a ``CheckpointPath`` (a
pathlib-like view of the listing, ``io/remote_path.py``); opening them (safetensors and DCP by range reads) and
pinning their objects' versions for a merge.

    layout, files = detect_remote_layout(tree, "checkpoint-100")    # ("safetensors", [RemoteObject, ...])
    framework = match_remote_layout(CheckpointPath(tree, "iter_0000100"))   # the megatron Layout, or None
    reader = open_remote_checkpoint(Url("s3", "bucket/run/checkpoint-100"))
    pin = pin_remote_checkpoint(url); ...; pin.verify()             # the same ETags after the merge, or an error

What a layout reads besides its weights comes from the small metadata files, one GET each (``trainer_state.json``,
DCP ``.metadata``, and the small torch pickles ``SMALL_PICKLES``: Megatron's ``common.pt``, OLMo-core's
``train/rank0.pt``, Lightning's sharded ``meta.pt``, accelerate's ``scheduler.bin``). A torch pickle of weights
(DeepSpeed's ``mp_rank_00_model_states.pt``, litgpt's ``lit_model.pth``, Composer's and nanoGPT's ``.pt``,
Lightning's ``.ckpt``, ``pytorch_model.bin``) is never fetched whole: its layout's ``detect`` / ``read_step`` see
its payload with meta tensors (the zip directory and ``data.pkl`` only; a step kept as a tensor costs one small
range read), and its ``open`` reads the chosen sub-dict by byte ranges (``io/remote_torch.py``). DeepSpeed's fp32
masters (ZeRO 3, ``--fp32-masters``) are read from every rank's optimizer file by ranges of the master records only
(``io/remote_zero.py``); accelerate's ``checkpoint_K`` folders take their step from ``optimizer.bin``'s data.pkl
and one small range per parameter's ``step`` record (``remote_torch.fetch_stored_values``), never the moments.
Other trainer or optimizer state pickles are refused in one line naming the checkpoint, the framework and the fix
(``NotRemoteYet``).
"""

from __future__ import annotations

import hashlib
import posixpath
from dataclasses import dataclass

from ckptmerge.errors import CheckpointFormatError
from ckptmerge.io.layout import SAFETENSORS_INDEX, TORCH_INDEX, TORCH_SUFFIXES
from ckptmerge.io.layouts import LAYOUTS, Layout, deepspeed, lightning, megatron, olmo_core
from ckptmerge.io.remote import Url, io_concurrency
from ckptmerge.io.remote_path import RemotePath, cached_read, subtree
from ckptmerge.io.remote_tree import RemoteObject, RemoteTree, remember_pin
from ckptmerge.io.shard_index import MAX_INDEX_BYTES, parse_weight_map

REMOTE_FORMATS = ("safetensors", "dcp", "torch")


def _join(rel: str, name: str) -> str:
    return f"{rel}/{name}" if rel else name


def detect_remote_layout(tree: RemoteTree, rel: str) -> tuple[str, list[RemoteObject]] | None:
    """(layout, weight objects) when ``rel`` in ``tree`` is a checkpoint, else None (rules of ``detect_layout``)."""
    if tree.is_file(rel):
        name = tree.object(rel).url.name  # rel is "" when the URL listed is the file itself
        if name.endswith(".safetensors"):
            return "safetensors", [tree.object(rel)]
        return ("torch", [tree.object(rel)]) if name.endswith(TORCH_SUFFIXES) else None
    if not tree.is_dir(rel):
        return None
    if tree.is_file(_join(rel, SAFETENSORS_INDEX)):
        return "safetensors", _shards(tree, rel, SAFETENSORS_INDEX)
    if tree.is_file(_join(rel, "model.safetensors")):
        return "safetensors", [tree.object(_join(rel, "model.safetensors"))]
    if tree.is_file(_join(rel, TORCH_INDEX)):
        return "torch", _shards(tree, rel, TORCH_INDEX)
    if tree.is_file(_join(rel, "pytorch_model.bin")):
        return "torch", [tree.object(_join(rel, "pytorch_model.bin"))]
    if tree.is_file(_join(rel, ".metadata")):
        return "dcp", [obj for key, obj in tree.under(rel).items() if key.endswith((".metadata", ".distcp"))]
    singles = [name for name in tree.children(rel) if name.endswith(".safetensors") and tree.is_file(_join(rel, name))]
    return ("safetensors", [tree.object(_join(rel, singles[0]))]) if len(singles) == 1 else None


def _shards(tree: RemoteTree, rel: str, index_name: str) -> list[RemoteObject]:
    """The shards an index names: plain names inside its folder, each listed; else CheckpointFormatError."""
    index = tree.object(_join(rel, index_name))
    if index.size > MAX_INDEX_BYTES:
        raise CheckpointFormatError(f"{index.url}: implausibly large shard index; fix or regenerate the index")
    weight_map = parse_weight_map(index.url, tree.read_bytes(_join(rel, index_name)))
    names = sorted(set(weight_map.values()))
    outside = [n for n in names if n.startswith("/") or "://" in n or posixpath.normpath(n).startswith("..")]
    if outside:
        raise CheckpointFormatError(f"{index.url}: names shard files outside its folder: {outside[:4]}; "
                                    f"an index may only name files inside the checkpoint folder")
    keys = [_join(rel, posixpath.normpath(n)) for n in names]
    missing = [str(tree.url(k)) for k in keys if not tree.is_file(k)]
    if missing:
        raise CheckpointFormatError(f"{index.url}: shard files listed in the index are missing: {missing[:8]}. "
                                    f"Upload the missing shards (incomplete upload?).")
    if not keys:
        raise CheckpointFormatError(f"{index.url}: the index's weight_map is empty; the checkpoint has no tensors.")
    return [tree.object(k) for k in keys]


def located(url: Url, lister=RemoteTree.shared) -> tuple[str, list[RemoteObject], RemoteTree]:
    """List ``url`` once (``lister``: from a merge's shared listing, or a fresh one) and tell its layout;
    CheckpointFormatError when it is no checkpoint."""
    tree = lister(url)
    if not tree.exists():
        raise CheckpointFormatError(f"{url}: no such object or folder (moved or deleted?); check the URL")
    found = detect_remote_layout(tree, "")
    if found is None:
        raise CheckpointFormatError(f"{url}: not a checkpoint ckptmerge can read. Expected an HF folder "
                                    f"(model.safetensors[.index.json] or pytorch_model.bin[.index.json]), a "
                                    f".safetensors file or a torch file ({', '.join(TORCH_SUFFIXES)}).")
    return found[0], found[1], tree


def open_remote_checkpoint(url: Url):
    """A reader for the checkpoint at ``url`` (safetensors or DCP, by range reads): a trainer's layout first, as
    ``io/dispatch.py`` does locally, then the plain formats; what cannot be read from a URL is refused in one line."""
    path = _listed_entry(url)
    layout = match_remote_layout(path)
    if layout is not None:
        return framework_call(layout, layout.open, path)
    return path.open_plain()


def open_remote_checkpoints(urls: list[Url]) -> list:
    """``open_remote_checkpoint`` of each URL, side by side (their headers, indexes and DCP metadata are independent
    requests); the readers in the order of ``urls``. On a failure the readers already opened are closed and the
    first failing URL's error (in that order) is raised, as opening one after another would."""
    if len(urls) <= 1:
        return [open_remote_checkpoint(u) for u in urls]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(len(urls), 16), thread_name_prefix="ckptmerge-open") as pool:
        futures = [pool.submit(open_remote_checkpoint, u) for u in urls]
    failed = next((f.exception() for f in futures if f.exception() is not None), None)
    if failed is None:
        return [f.result() for f in futures]
    for future in futures:
        if future.exception() is None:
            future.result().close()
    raise failed


def _listed_entry(url: Url) -> CheckpointPath:
    """``url`` as a ``CheckpointPath`` of its listing; DeepSpeed rank 0's optimizer file (the entry that
    ``--fp32-masters`` names: ``layouts.deepspeed.masters_entry``) inside the listing of its tag folder, whose other
    ranks' files and model states it reads."""
    masters_file = deepspeed.is_masters_name(url.name)
    tree = RemoteTree.shared(url.parent if masters_file else url)
    path = CheckpointPath(tree) / url.name if masters_file else CheckpointPath(tree)
    if not path.exists():
        raise CheckpointFormatError(f"{url}: no such object or folder (moved or deleted?); check the URL")
    return path


class NotRemoteYet(CheckpointFormatError):
    """What a layout needs is not read from a URL yet (a state pickle, ZeRO-3's partitioned optimizer files): one
    line naming the checkpoint, the framework (when known) and the fix."""

    def __init__(self, where: object, what: str, framework: str | None = None):
        self.where, self.what, self.framework = where, what, framework
        article = "an" if framework and (framework[0] in "aeiou" or framework.startswith("hf")) else "a"
        claim = f"{article} {framework} checkpoint, and " if framework else ""
        super().__init__(f"{where}: {claim}{what}; ckptmerge does not read this from a URL yet. {SYNC_FIX}")


SYNC_FIX = ("Copy the run to a local folder (e.g. `aws s3 sync URL DIR`, `gcloud storage rsync`, fsspec's `get`) "
            "and give that folder.")
SMALL_PICKLES = (megatron.COMMON, olmo_core.TRAIN_STATE.as_posix(), lightning.SHARDED_META, "scheduler.bin")
STEP_PICKLES = frozenset({"optimizer.bin"})  # accelerate's step: data.pkl and the step records, by range
MAX_SMALL_PICKLE_BYTES = 16 * 1024 * 1024
# trainers' state files, never weights (merging/discover.NOT_WEIGHTS; io may not import merging)
STATE_PICKLES = frozenset({"training_args.bin", "optimizer.pt", "optimizer.bin", "scheduler.pt", "scheduler.bin",
                           "rng_state.pth", "common.pt"})


class CheckpointPath(RemotePath):
    """A ``RemotePath`` whose readers are the remote ones: ``io/layouts/base.py`` sends a layout's file access
    here (``plain_layout``, ``open_plain``, ``open_dcp``, ``open_torch_files``, ``torch_payload``)."""

    def plain_layout(self) -> tuple[str, list[RemotePath]] | None:
        found = detect_remote_layout(self.tree, self._inside())
        if found is None:
            return None
        prefix = f"{self.tree.root.path}/"
        return found[0], [self._at(o.url.path[len(prefix):] if o.url != self.tree.root else "") for o in found[1]]

    def open_plain(self):
        found = detect_remote_layout(self.tree, self._inside())
        if found is None:
            raise CheckpointFormatError(f"{self}: not a checkpoint ckptmerge can read. Expected an HF folder "
                                        f"(model.safetensors[.index.json] or pytorch_model.bin[.index.json]), a "
                                        f".safetensors file or a torch file ({', '.join(TORCH_SUFFIXES)}).")
        layout, files = found
        if layout == "torch":  # pytorch_model.bin[.index.json], a .pt / .bin file: zip records by range
            from ckptmerge.io.remote_torch import open_remote_torch

            return open_remote_torch(self.tree, files, display=self.url)
        if layout not in REMOTE_FORMATS:
            raise NotRemoteYet(self, f"its weights are torch pickles ({', '.join(o.url.name for o in files[:2])}; or "
                                     f"convert them to safetensors)")
        if layout == "dcp":
            return self.open_dcp()
        from ckptmerge.io.remote_safetensors import RemoteSafetensorsReader

        return RemoteSafetensorsReader(self.tree.fs, files, display_path=self.url, concurrency=io_concurrency())

    def open_dcp(self, **options):
        """``DcpReader(folder, display_path=..., names=...)`` over range reads of this folder's objects."""
        display = options.get("display_path")
        if isinstance(display, RemotePath):
            options["display_path"] = display.url
        return _layout_dcp_reader(subtree(self.tree, self._inside()), self.url, options)

    def open_torch_files(self, files: list[RemotePath]):
        """``TorchFileReader(files, display_path=self)`` by range reads (``io/remote_torch.py``)."""
        from ckptmerge.io.remote_torch import open_remote_torch

        return open_remote_torch(self.tree, [self.tree.object(f._inside()) for f in files], display=self.url)

    def torch_payload(self) -> object:
        """A small metadata pickle's object (one GET, restricted unpickler); a weights file's payload with meta
        tensors (its zip directory and data.pkl only: ``remote_torch.remote_payload_object``), for a layout's
        ``detect`` and ``read_step`` (a tensor's value by one range read: ``stored_value``); optimizer / trainer
        state pickles are refused."""
        rel = self._inside()
        small = any(rel == name or rel.endswith("/" + name) for name in SMALL_PICKLES)
        if small and self.is_file() and self.stat().st_size <= MAX_SMALL_PICKLE_BYTES:
            return _load_pickle(self, cached_read(self.tree, rel))
        weights = self.name not in STATE_PICKLES and not self.name.startswith("rng_state")
        if self.is_file() and (weights or self.name in STEP_PICKLES):
            from ckptmerge.io.remote_torch import DIRECTORY_READ_AHEAD, STATE_READ_AHEAD, remote_payload_object

            ahead = STATE_READ_AHEAD if self.name in STEP_PICKLES else DIRECTORY_READ_AHEAD  # not into the moments
            return remote_payload_object(self.tree.fs, self.tree.object(rel), read_ahead=ahead)  # meta tensors
        raise NotRemoteYet(self, f"{self.name} is a torch pickle of trainer or optimizer state")

    def open_torch_weights(self, file: RemotePath, weights_of, framework: str, *, strip_attribute: bool = False,
                           half_to_fp32: bool = False):
        """``layouts.base.torch_weights_reader`` at a URL: the sub-dict ``weights_of(payload)`` of torch file
        ``file``, read by byte ranges (``remote_torch.open_remote_torch``), named and described as locally."""
        from ckptmerge.io.remote_torch import open_remote_torch

        return open_remote_torch(self.tree, [self.tree.object(file._inside())], display=self.url, weights_of=weights_of,
                                 framework=framework, strip_attribute=strip_attribute, half_to_fp32=half_to_fp32)

    def open_zero_masters(self):
        """``layouts.base.zero_masters_reader`` at a URL: DeepSpeed's fp32 masters (ZeRO 3, ``--fp32-masters``) of
        this entry's tag folder, by ranges of every rank's master records (``io/remote_zero.py``)."""
        from ckptmerge.io.remote_zero import RemoteZeroMastersReader

        return RemoteZeroMastersReader(deepspeed._tag(self), deepspeed._model_states(self), display_path=self.url)


def _layout_dcp_reader(tree: RemoteTree, url: Url, options: dict):
    """``io/remote_dcp.RemoteDcpReader`` with a layout's ``display_path`` and ``names`` rule."""
    from ckptmerge.io.dcp_reader import DcpReader
    from ckptmerge.io.remote_dcp import RemoteDcpReader

    class LayoutDcpReader(RemoteDcpReader):
        def __init__(self):
            self._tree = tree
            DcpReader.__init__(self, url, **options)

    return LayoutDcpReader()


def _load_pickle(path: RemotePath, data: bytes) -> object:
    """``torch_reader.load_torch_payload`` on bytes read from a URL (restricted unpickler, nothing executed)."""
    import io
    import pickle

    from ckptmerge.errors import CkptMergeError, UnsafeCheckpointError
    from ckptmerge.io.safe_pickle import load_torch_file_restricted

    try:
        return load_torch_file_restricted(io.BytesIO(data), mmap=False)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(f"{path}: refusing to load: {str(exc).splitlines()[0]}. Nothing from it was "
                                    f"executed.") from exc
    except CkptMergeError:
        raise
    except Exception as exc:  # a corrupt pickle stream fails in many ways
        raise CheckpointFormatError(f"{path}: cannot read torch file ({type(exc).__name__}: {str(exc)[:200]}); "
                                    f"is the object complete?") from exc


def match_remote_layout(path: CheckpointPath) -> Layout | None:
    """``io.layouts.match_layout`` on a remote entry: the first layout whose rule claims it. A rule that would have
    to read a trainer-state pickle to decide refuses the entry in one line, naming the layouts that could claim it."""
    for i, layout in enumerate(LAYOUTS):
        try:
            claimed = layout.detect(path)
        except NotRemoteYet:
            maybe = [layout.name] + [other.name for other in LAYOUTS[i + 1:] if _needs_pickle(other, path)]
            raise NotRemoteYet(path, f"{path.name} is a torch pickle, which the {' / '.join(maybe)} layout"
                                     f"{'s' if len(maybe) > 1 else ''} read to tell a checkpoint") from None
        if claimed:
            return layout
    return None


def _needs_pickle(layout: Layout, path: CheckpointPath) -> bool:
    try:
        layout.detect(path)
    except NotRemoteYet:
        return True
    return False


def framework_call(layout: Layout, call, path: CheckpointPath):
    """``call(path)`` (a layout's ``read_step`` or ``open``); a refusal names the framework and the checkpoint."""
    try:
        return call(path)
    except NotRemoteYet as exc:
        if exc.framework is not None:
            raise
        raise NotRemoteYet(path, exc.what, layout.name) from None


@dataclass
class PinnedRemoteCheckpoint:
    """A remote checkpoint's weight objects as they were listed before the merge: ``verify`` lists them again."""

    path: Url
    versions: dict[str, str]
    fingerprint: str | None

    def verify(self) -> None:
        """Raise CheckpointFormatError if any object changed, appeared or disappeared since it was pinned."""
        try:
            now = _versions(_pinned_objects(self.path, RemoteTree.relisted))
        except CheckpointFormatError:
            now = {}
        if now != self.versions:
            changed = sorted(k for k in set(now) | set(self.versions) if now.get(k) != self.versions.get(k))
            raise CheckpointFormatError(f"{self.path}: changed while it was being merged ({', '.join(changed[:4])}: "
                                        f"another ETag than the one planned); nothing was published. Rerun the merge "
                                        f"once the checkpoint is no longer modified.")


def pin_remote_checkpoint(url: Url, mode: str = "sampled") -> PinnedRemoteCheckpoint:
    """The versions (ETags) of ``url``'s weight objects, and a fingerprint over them (``etag-sha256:...``):
    the store's own content tags stand in for a hash of the bytes, which would cost a second read."""
    versions = _versions(_pinned_objects(url, RemoteTree.shared))
    remember_pin(url.parent if deepspeed.is_masters_name(url.name) else url)
    digest = hashlib.sha256("".join(f"{k}:{v}\n" for k, v in sorted(versions.items())).encode())
    return PinnedRemoteCheckpoint(url, versions, None if mode == "none" else f"etag-sha256:{digest.hexdigest()}")


def _versions(files: list[RemoteObject]) -> dict[str, str]:
    return {str(obj.url): f"{obj.size}:{obj.version}" for obj in files}


def _pinned_objects(url: Url, lister) -> list[RemoteObject]:
    """The objects a merge pins: a plain checkpoint's weight objects; a trainer's folder that no plain rule reads
    (OLMo-core's ``stepN/``), every object in it (as ``fingerprint.weight_files`` does locally); DeepSpeed rank 0's
    optimizer file (``--fp32-masters``), every object of its tag folder (each rank's masters and the model states).
    ``lister``: ``RemoteTree.shared`` to pin (the merge's listing), ``RemoteTree.relisted`` to verify (fresh)."""
    if deepspeed.is_masters_name(url.name):
        return list(lister(url.parent).objects.values())
    tree = lister(url)
    found = detect_remote_layout(tree, "") if tree.exists() else None
    if found is not None:
        return found[1]
    if tree.exists() and match_remote_layout(CheckpointPath(tree)) is not None:
        return list(tree.objects.values())
    return located(url, lister)[1]  # the one-line error
