"""Read PyTorch ``.pth`` checkpoints into NumPy without importing torch.

Two on-disk formats are understood:

* the zip format (``torch.save`` default since PyTorch 1.6): ``<prefix>/data.pkl`` plus one
  raw little-endian file per storage under ``<prefix>/data/<key>``;
* the legacy stream format (PyTorch 0.4-1.5, and e.g. torchvision's ``vgg16-397923af.pth``
  and lpips' ``weights/v0.1/vgg.pth``): magic number, protocol version and system info
  pickles, the object pickle, the list of storage keys, then each storage's raw bytes.

The very old tar format (before PyTorch 0.4) is rejected with a message pointing at torch.

Safety: unpickling runs through an ``Unpickler`` whose ``find_class`` only hands out a
fixed set of harmless callables (tensor rebuilders that build NumPy arrays, storage and
dtype markers, ``OrderedDict``). Any other global raises ``UnsafeCheckpointError``, so a
checkpoint can never execute arbitrary code through this reader.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import tarfile
import zipfile
from collections.abc import Mapping
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

__all__ = ["load_torch_state_dict", "TorchPickleError", "UnsafeCheckpointError"]


class TorchPickleError(ValueError):
    """The file is not a checkpoint this reader can decode."""


class UnsafeCheckpointError(TorchPickleError, pickle.UnpicklingError):
    """The pickle asked for a global outside the allow-list."""


# torch storage class names (as pickled, module ``torch``) -> element dtype.
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype("<f8"),
    "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
    "ComplexFloatStorage": np.dtype("<c8"),
    "ComplexDoubleStorage": np.dtype("<c16"),
}

# torch dtype names (globals ``torch.<name>``, used by ``_rebuild_tensor_v3``) -> dtype.
_TORCH_DTYPES: dict[str, np.dtype] = {
    "float64": np.dtype("<f8"),
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "int64": np.dtype("<i8"),
    "int32": np.dtype("<i4"),
    "int16": np.dtype("<i2"),
    "int8": np.dtype("i1"),
    "uint8": np.dtype("u1"),
    "uint16": np.dtype("<u2"),
    "uint32": np.dtype("<u4"),
    "uint64": np.dtype("<u8"),
    "bool": np.dtype("?"),
    "complex64": np.dtype("<c8"),
    "complex128": np.dtype("<c16"),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
    "float8_e4m3fnuz": np.dtype(ml_dtypes.float8_e4m3fnuz),
    "float8_e5m2fnuz": np.dtype(ml_dtypes.float8_e5m2fnuz),
}

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


class _StorageType:
    """Stands in for ``torch.FloatStorage`` etc.; ``dtype`` None means untyped bytes."""

    def __init__(self, name: str, dtype: np.dtype | None):
        self.name = name
        self.dtype = dtype

    def __repr__(self) -> str:
        return f"torch.{self.name}"


class _DType:
    """Stands in for a ``torch.<dtype>`` global."""

    def __init__(self, name: str, dtype: np.dtype):
        self.name = name
        self.dtype = dtype


class _Storage:
    """A flat storage: dtype, element count, and (once read) a 1-D NumPy array."""

    def __init__(self, dtype: np.dtype, numel: int):
        self.dtype = dtype
        self.numel = numel
        self.data: np.ndarray | None = None


class _StorageView:
    """A legacy-format view ``root[offset : offset + numel]``."""

    def __init__(self, root: _Storage, offset: int, numel: int):
        self.root = root
        self.offset = offset
        self.numel = numel


class _PendingTensor:
    """A tensor whose storage bytes may not be read yet (legacy format)."""

    def __init__(self, storage: Any, offset: int, size: tuple, stride: tuple, dtype: Any):
        self.storage = storage
        self.offset = int(offset)
        self.size = tuple(int(s) for s in size)
        self.stride = tuple(int(s) for s in stride)
        self.dtype = dtype  # np.dtype for v3 tensors over untyped storage, else None

    def materialize(self) -> np.ndarray:
        storage, base = self.storage, 0
        if isinstance(storage, _StorageView):
            storage, base = storage.root, storage.offset
        if not isinstance(storage, _Storage) or storage.data is None:
            raise TorchPickleError("tensor refers to a storage whose data was never read")
        flat = storage.data
        if base:
            flat = flat[base:]
        if self.dtype is not None and self.dtype != flat.dtype:
            usable = flat.nbytes - flat.nbytes % self.dtype.itemsize
            flat = flat.view(np.uint8)[:usable].view(self.dtype)
        return _strided_copy(flat, self.offset, self.size, self.stride)


def _strided_copy(flat: np.ndarray, offset: int, size: tuple, stride: tuple) -> np.ndarray:
    """Copy ``flat[offset + sum(i_k * stride_k)]`` into a fresh array of shape ``size``."""
    if len(size) != len(stride):
        raise TorchPickleError(f"tensor size {size} and stride {stride} differ in rank")
    if any(s < 0 for s in size) or any(s < 0 for s in stride) or offset < 0:
        raise TorchPickleError(f"negative size/stride/offset: {size} {stride} {offset}")
    if 0 in size:
        return np.empty(size, dtype=flat.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= flat.shape[0]:
        raise TorchPickleError(
            f"tensor (offset {offset}, size {size}, stride {stride}) reads past the end "
            f"of its storage of {flat.shape[0]} elements"
        )
    item = flat.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        flat[offset:], shape=size, strides=tuple(s * item for s in stride), writeable=False
    )
    return np.array(view, order="C", copy=True)


def _rebuild_tensor(storage, storage_offset, size, stride) -> _PendingTensor:
    return _PendingTensor(storage, storage_offset, size, stride, None)


def _rebuild_tensor_v2(
    storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None
) -> _PendingTensor:
    del requires_grad, backward_hooks, metadata
    return _PendingTensor(storage, storage_offset, size, stride, None)


def _rebuild_tensor_v3(
    storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None
) -> _PendingTensor:
    del requires_grad, backward_hooks, metadata
    if not isinstance(dtype, _DType):
        raise TorchPickleError(f"unsupported tensor dtype {dtype!r}")
    return _PendingTensor(storage, storage_offset, size, stride, dtype.dtype)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    del requires_grad, backward_hooks, state
    return data


def _codecs_encode(text: str, encoding: str = "utf-8") -> bytes:
    # Protocol-2 pickles written by Python 3 store ``bytes`` objects this way.
    if encoding not in ("latin1", "latin-1"):
        raise UnsafeCheckpointError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch", "Size"): tuple,
    ("_codecs", "encode"): _codecs_encode,
    ("torch.storage", "UntypedStorage"): _StorageType("UntypedStorage", None),
    ("torch", "UntypedStorage"): _StorageType("UntypedStorage", None),
}
_ALLOWED_GLOBALS.update(
    {("torch", name): _StorageType(name, dt) for name, dt in _STORAGE_DTYPES.items()}
)
_ALLOWED_GLOBALS.update({("torch", name): _DType(name, dt) for name, dt in _TORCH_DTYPES.items()})


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only allow-listed globals and torch storage records."""

    def __init__(self, file: BinaryIO, storages: dict[str, _Storage], legacy: bool):
        super().__init__(file, encoding="utf-8")
        self._storages = storages
        self._legacy = legacy

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"refusing to load global '{module}.{name}': this reader only decodes plain "
                "tensor state dicts (no arbitrary Python objects); load the file with torch "
                "and re-save its state_dict if it really contains other objects"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        if not isinstance(pid, tuple) or not pid:
            raise TorchPickleError(f"unexpected persistent id {pid!r}")
        kind = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
        if kind == "module" and self._legacy:
            # Legacy files may record whole nn.Module classes; never materialise them.
            raise UnsafeCheckpointError("file pickles an nn.Module object, not a state dict")
        if kind != "storage":
            raise TorchPickleError(f"unknown persistent id kind {kind!r}")
        if self._legacy:
            storage_type, key, _location, numel, view = pid[1:6]
        else:
            storage_type, key, _location, numel = pid[1:5]
            view = None
        if not isinstance(storage_type, _StorageType):
            raise TorchPickleError(f"unknown storage type {storage_type!r}")
        dtype = storage_type.dtype if storage_type.dtype is not None else np.dtype("u1")
        key = str(key)
        storage = self._storages.get(key)
        if storage is None:
            storage = self._storages[key] = _Storage(dtype, int(numel))
        if view is not None:
            _view_key, offset, view_numel = view
            return _StorageView(storage, int(offset), int(view_numel))
        return storage


def _materialize(obj: Any) -> Any:
    """Replace every ``_PendingTensor`` inside dicts/lists/tuples by its NumPy array."""
    if isinstance(obj, _PendingTensor):
        return obj.materialize()
    if isinstance(obj, dict):
        for k in list(obj.keys()):
            obj[k] = _materialize(obj[k])
        return obj
    if isinstance(obj, list):
        obj[:] = [_materialize(v) for v in obj]
        return obj
    if type(obj) is tuple:
        return tuple(_materialize(v) for v in obj)
    return obj


def _load_zip(path: str) -> Any:
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkl = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
        if len(pkl) != 1:
            raise TorchPickleError(f"{path}: zip file without a single data.pkl (found {pkl})")
        prefix = pkl[0][: -len("data.pkl")]
        big_endian = False
        if prefix + "byteorder" in names:
            big_endian = zf.read(prefix + "byteorder").strip() == b"big"
        storages: dict[str, _Storage] = {}
        obj = _RestrictedUnpickler(io.BytesIO(zf.read(pkl[0])), storages, legacy=False).load()
        for key, st in storages.items():
            record = f"{prefix}data/{key}"
            if record not in names:
                raise TorchPickleError(f"{path}: storage record '{record}' is missing")
            raw = zf.read(record)
            dtype = st.dtype.newbyteorder(">") if big_endian and st.dtype.itemsize > 1 else st.dtype
            need = st.numel * st.dtype.itemsize
            if len(raw) < need:
                raise TorchPickleError(
                    f"{path}: storage '{key}' has {len(raw)} bytes, expected {need}"
                )
            st.data = np.frombuffer(raw, dtype=dtype, count=st.numel).astype(st.dtype)
    return _materialize(obj)


def _load_legacy(path: str, f: BinaryIO) -> Any:
    def load_plain() -> Any:
        # Header pickles hold only ints and dicts; the restricted unpickler guards them too.
        return _RestrictedUnpickler(f, {}, legacy=True).load()

    try:
        magic = load_plain()
    except Exception as e:  # noqa: BLE001 - any failure means "not this format"
        raise TorchPickleError(
            f"{path}: not a PyTorch checkpoint this reader understands ({e})"
        ) from None
    if magic != _LEGACY_MAGIC:
        raise TorchPickleError(f"{path}: not a PyTorch checkpoint (bad magic number)")
    protocol = load_plain()
    if protocol != _LEGACY_PROTOCOL:
        raise TorchPickleError(f"{path}: unsupported legacy protocol version {protocol}")
    sys_info = load_plain()
    if isinstance(sys_info, dict) and sys_info.get("little_endian") is False:
        raise TorchPickleError(f"{path}: big-endian legacy checkpoints are not supported")
    storages: dict[str, _Storage] = {}
    obj = _RestrictedUnpickler(f, storages, legacy=True).load()
    keys = load_plain()
    for key in keys:
        key = str(key)
        st = storages.get(key)
        if st is None:
            raise TorchPickleError(f"{path}: data for unknown storage '{key}'")
        header = f.read(8)
        if len(header) != 8:
            raise TorchPickleError(f"{path}: truncated file (storage '{key}')")
        (numel,) = struct.unpack("<q", header)
        if numel != st.numel:
            raise TorchPickleError(
                f"{path}: storage '{key}' holds {numel} elements, expected {st.numel}"
            )
        raw = f.read(numel * st.dtype.itemsize)
        if len(raw) != numel * st.dtype.itemsize:
            raise TorchPickleError(f"{path}: truncated file (storage '{key}')")
        st.data = np.frombuffer(raw, dtype=st.dtype).copy()
    return _materialize(obj)


def load_torch_state_dict(path: str | os.PathLike) -> dict[str, Any]:
    """Load a ``torch.save``-d dict of tensors as ``{name: np.ndarray}`` without torch.

    Tensors come back as C-contiguous NumPy arrays with their torch dtype (bfloat16 and
    float8 via ``ml_dtypes``), honouring storage offsets, sizes and strides. If the file
    holds a wrapper dict (e.g. with ``'state_dict'`` or ``'model'`` keys) the whole dict is
    returned and the caller picks the entry it needs.

    Raises:
      UnsafeCheckpointError: the pickle references anything but tensors/containers.
      TorchPickleError: unknown or corrupt format (including the pre-0.4 tar format).
    """
    path = os.fspath(path)
    if zipfile.is_zipfile(path):
        obj = _load_zip(path)
    else:
        with open(path, "rb") as f:
            if _is_tar(f):
                raise TorchPickleError(
                    f"{path}: this is the pre-0.4 PyTorch tar checkpoint format, which the "
                    "torch-free reader does not support; load it with torch.load and re-save "
                    "it with torch.save (zip format)"
                )
            obj = _load_legacy(path, f)
    if not isinstance(obj, dict):
        raise TorchPickleError(
            f"{path}: top-level object is {type(obj).__name__}, expected a dict of tensors"
        )
    return obj


def unwrap_state_dict(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    """The tensor dict inside a wrapper checkpoint (its ``'state_dict'`` or ``'model'``
    entry, as Lightning and many training scripts save), else ``obj`` itself."""
    for key in ("state_dict", "model"):
        inner = obj.get(key)
        if isinstance(inner, Mapping):
            return inner
    return obj


def _is_tar(f: BinaryIO) -> bool:
    try:
        with tarfile.open(fileobj=f, mode="r:"):
            return True
    except tarfile.TarError:
        return False
    finally:
        f.seek(0)
