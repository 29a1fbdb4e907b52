"""Read pickles without executing them: tensors and plain containers come back real, the rest inert.

Training checkpoints pickle more than tensors: argparse ``Namespace``, dataclasses, numpy RNG
state, ``TorchVersion``, ``timedelta``, Megatron / OLMo-core metadata classes. ``pickle.load``
would import and call all of those; ``torch.load(weights_only=True)`` refuses the whole file.
Here a global is resolved to a real object only when it is a tensor-rebuild function, a torch
dtype / size / device, or a plain container. Every other global becomes a ``Placeholder``
subclass named after it: never imported, never called. The pickle's calls on it (REDUCE,
NEWOBJ, BUILD, SETITEMS, APPEND) only record their arguments, so the data inside stays
reachable (``placeholder.state``, attribute access) and nothing runs.

Globals that exist only to run code (``os.system``, ``builtins.eval``, ``subprocess.*``, ...)
are not even turned into placeholders: the file is refused with ``pickle.UnpicklingError``,
because no honest checkpoint names them.
"""

from __future__ import annotations

import io
import pickle
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any, BinaryIO

import torch

_REAL_GLOBALS: dict[str, dict[str, Any]] = {
    "collections": {"OrderedDict": OrderedDict, "Counter": Counter},
    "builtins": {"set": set, "frozenset": frozenset, "bytearray": bytearray, "complex": complex, "slice": slice},
    "torch": {"Size": torch.Size, "device": torch.device, "Tensor": torch.Tensor},
    "torch.nn.parameter": {"Parameter": torch.nn.Parameter},
    "torch.serialization": {"_get_layout": torch.serialization._get_layout},
    "torch.storage": {"UntypedStorage": torch.storage.UntypedStorage, "TypedStorage": torch.storage.TypedStorage},
    "torch._utils": {name: getattr(torch._utils, name) for name in (
        "_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
        "_rebuild_parameter_with_state", "_rebuild_meta_tensor_no_storage")},
}
_CODE_RUNNING_MODULES = frozenset({
    "os", "posix", "nt", "subprocess", "sys", "importlib", "runpy", "shutil", "socket", "pty", "ctypes",
    "webbrowser", "code", "codeop", "pickle", "_pickle", "marshal", "platform", "pdb", "timeit", "signal"})
_CODE_RUNNING_BUILTINS = frozenset({
    "eval", "exec", "compile", "open", "__import__", "getattr", "setattr", "delattr", "globals", "locals",
    "vars", "input", "breakpoint", "exit", "quit", "help", "memoryview", "type", "object", "super"})
_NESTED_PICKLE_LOADERS = frozenset({("torch.storage", "_load_from_bytes")})  # would unpickle freely inside


class Placeholder:
    """An object the pickle named but that was never imported; holds only what the pickle gave it.

    ``global_name`` is ``module.name`` of the stand-in; ``args`` the constructor / reduce
    arguments; ``state`` what BUILD passed (usually the object's ``__dict__``); ``items`` and
    ``elements`` what a dict or list subclass was filled with. Attributes read from ``state``.
    """

    global_name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> Placeholder:
        obj = object.__new__(cls)
        object.__setattr__(obj, "args", args)
        object.__setattr__(obj, "state", None)
        object.__setattr__(obj, "items", {})
        object.__setattr__(obj, "elements", [])
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        object.__setattr__(self, "state", state)

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items[key] = value

    def append(self, value: Any) -> None:
        self.elements.append(value)

    def extend(self, values: Any) -> None:
        self.elements.extend(values)

    def __getattr__(self, name: str) -> Any:
        fields = state_fields(self)
        if name in fields:
            return fields[name]
        raise AttributeError(f"{self.global_name} placeholder has no field {name!r}")

    def __repr__(self) -> str:
        return f"<unexecuted {self.global_name}>"


def state_fields(obj: Placeholder) -> dict[str, Any]:
    """The named fields a placeholder received: ``__dict__`` state, slot state, or both."""
    state = object.__getattribute__(obj, "state")
    if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
        merged = dict(state[0] or {})
        merged.update(state[1] or {})
        return merged
    return state if isinstance(state, dict) else {}


def _rebuild_from_type(func: Any, new_type: Any, args: tuple, state: Any) -> Any:
    """torch's tensor-subclass rebuild, keeping plain tensors when the subclass is not a real class."""
    if isinstance(new_type, type) and issubclass(new_type, torch.Tensor):
        return torch._tensor._rebuild_from_type_v2(func, new_type, args, state)
    return func(*args)


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves globals as the module docstring says.

    Args:
        extra_globals: ``{module: {name, ...}}`` of further real classes to import (DCP metadata).
    """

    extra_globals: dict[str, frozenset[str]] = {}

    def find_class(self, module: str, name: str) -> Any:
        real = _REAL_GLOBALS.get(module, {}).get(name)
        if real is not None:
            return real
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module == "torch._tensor" and name == "_rebuild_from_type_v2":
            return _rebuild_from_type
        if module == "_codecs" and name == "encode":
            return _latin1_encode
        if name in self.extra_globals.get(module, ()):
            return super().find_class(module, name)
        if (module.split(".")[0] in _CODE_RUNNING_MODULES or (module == "builtins" and name in _CODE_RUNNING_BUILTINS)
                or (module, name) in _NESTED_PICKLE_LOADERS):
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed: it could run code")
        return _placeholder_class(module, name)


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """What protocol-2 pickles call to rebuild ``bytes``; only the latin1 round trip is honoured."""
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return text.encode("latin1")


_CLASSES: dict[tuple[str, str], type] = {}


def _placeholder_class(module: str, name: str) -> type:
    key = (module, name)
    if key not in _CLASSES:
        _CLASSES[key] = type(name, (Placeholder,), {"global_name": f"{module}.{name}", "__module__": __name__})
    return _CLASSES[key]


class _PickleModule:
    """What ``torch.load(pickle_module=...)`` needs: an ``Unpickler`` and ``load``."""

    Unpickler = RestrictedUnpickler
    UnpicklingError = pickle.UnpicklingError
    __name__ = "ckptmerge.io.safe_pickle"

    @staticmethod
    def load(file: BinaryIO, **kwargs: Any) -> Any:
        return RestrictedUnpickler(file, **kwargs).load()


def load_torch_file_restricted(path: Path, *, mmap: bool = True) -> Any:
    """``torch.load`` of a zip (or legacy) torch file through the restricted unpickler, on CPU.

    Raises:
        pickle.UnpicklingError: the file names a code-running global (nothing was run).
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap, pickle_module=_PickleModule)
    except RuntimeError as exc:
        if not mmap or "mmap" not in str(exc):
            raise
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_PickleModule)


def loads_restricted(data: bytes, extra_globals: dict[str, frozenset[str]] | None = None) -> Any:
    """Unpickle a plain (non-torch) pickle with the restricted unpickler."""
    unpickler = RestrictedUnpickler(io.BytesIO(data))
    if extra_globals:
        unpickler.extra_globals = extra_globals
    return unpickler.load()
