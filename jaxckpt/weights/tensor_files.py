"""Files of named tensors, opened lazily: safetensors files and PyTorch state dicts.

An opener reads a file's header (or memory-maps a PyTorch file) and returns, for each key, how to
read the tensor, its stored shape and its numpy dtype; `LazyTensor` wraps one such entry, transposed
to Flax's layout on read where asked. Naming and layout rules live in `jaxckpt.weights.foreign`
(a single file) and `jaxckpt.weights.hf` (an HF folder), which both build on these.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Sequence

import ml_dtypes  # Registers bfloat16/float8 with numpy, so BF16 tensors can be read.
import numpy as np

from jaxckpt.errors import MissingDependencyError, UserError

_SAFETENSORS_DTYPES = {
    "BOOL": np.bool_, "U8": np.uint8, "I8": np.int8, "U16": np.uint16, "I16": np.int16,
    "U32": np.uint32, "I32": np.int32, "U64": np.uint64, "I64": np.int64,
    "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F32": np.float32, "F64": np.float64,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}


class LazyTensor:
    """A tensor in a file: shape and dtype known up front, bytes read by `np.asarray(lazy)`.

    Attributes:
        shape: the shape after layout conversion.
        dtype: the numpy dtype.
        source: where it comes from, e.g. `"model.safetensors:encoder.0.weight (transposed)"`.
    """

    def __init__(self, read: Callable[[], np.ndarray], shape: Sequence[int], dtype: Any,
                 source: str, perm: tuple[int, ...] | None = None):
        self._read = read
        self._perm = perm
        self._stored_shape = tuple(int(d) for d in shape)
        self.shape = self._stored_shape if perm is None else tuple(self._stored_shape[p] for p in perm)
        self.dtype = np.dtype(dtype)
        self.source = source + (" (transposed)" if perm is not None else "")

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        array = np.asarray(self._read())
        if tuple(array.shape) != self._stored_shape:
            raise ValueError(
                f"{self.source}: the file holds shape {array.shape}, its header said "
                f"{self._stored_shape}; the file may have changed since it was opened."
            )
        if self._perm is not None:
            array = np.ascontiguousarray(np.transpose(array, self._perm))
        return array if dtype is None else array.astype(dtype, copy=False)

    def __repr__(self) -> str:
        return f"LazyTensor({self.source}, shape={self.shape}, dtype={self.dtype})"


Entry = tuple[Callable[[], np.ndarray], tuple[int, ...], Any]
"""`(read, shape, dtype)` of one tensor in a file: `read()` returns its bytes as stored."""


def open_safetensors(path: str) -> tuple[dict[str, Entry], Mapping[str, str]]:
    """`({key: (read, shape, dtype)}, header metadata)` of a safetensors file, from its header only.

    Raises:
        MissingDependencyError: if safetensors is not installed.
        ValueError: for a tensor whose dtype numpy cannot hold.
    """
    try:
        import safetensors
    except ImportError:
        raise MissingDependencyError(
            f"Reading {path!r} needs the safetensors package: pip install jaxckpt[safetensors]."
        ) from None
    entries = {}
    with safetensors.safe_open(path, framework="numpy") as f:
        header = f.metadata() or {}
        for key in f.keys():
            view = f.get_slice(key)
            dtype = _SAFETENSORS_DTYPES.get(view.get_dtype())
            if dtype is None:
                raise ValueError(f"{path!r}: tensor {key!r} has dtype {view.get_dtype()}, which numpy "
                                 "cannot hold; convert it before saving.")
            entries[key] = (_safetensors_reader(safetensors, path, key), tuple(view.get_shape()), dtype)
    return entries, header


def _safetensors_reader(safetensors: Any, path: str, key: str) -> Callable[[], np.ndarray]:
    def read() -> np.ndarray:
        # Opening maps the file; only this tensor's bytes are copied.
        with safetensors.safe_open(path, framework="numpy") as f:
            return f.get_tensor(key)
    return read


def open_torch(path: str) -> dict[str, Entry]:
    """`{key: (read, shape, dtype)}` of a PyTorch state dict, memory-mapped where the file allows.

    Raises:
        MissingDependencyError: if torch is not installed (the message says how to convert the file).
        ValueError: if the file holds something other than a state dict of tensors.
    """
    try:
        import torch
    except ImportError:
        raise MissingDependencyError(
            f"Reading the PyTorch file {path!r} needs torch, which is not installed: pip install torch. "
            "Or convert the file to .safetensors where torch is installed, which then loads without it: "
            "python -c \"import torch, safetensors.torch as st; "
            f"st.save_file(torch.load('{path}'), '{os.path.splitext(path)[0]}.safetensors')\"."
        ) from None
    try:
        # mmap keeps tensor storages on disk until a tensor is converted.
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # Legacy (non-zip) files cannot be memory-mapped.
        state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ValueError(f"{path!r} holds a {type(state).__name__}, not a state dict; save "
                         "model.state_dict() instead of the model.")
    entries = {}
    for key, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{path!r}: entry {key!r} is a {type(tensor).__name__}, not a tensor; "
                             "save a plain model.state_dict().")
        dtype = _torch_numpy_dtype(torch, tensor.dtype)
        entries[str(key)] = (_torch_reader(torch, tensor), tuple(tensor.shape), dtype)
    return entries


def _torch_numpy_dtype(torch: Any, dtype: Any) -> Any:
    if dtype == torch.bfloat16:
        return ml_dtypes.bfloat16
    return torch.empty((), dtype=dtype).numpy().dtype


def _torch_reader(torch: Any, tensor: Any) -> Callable[[], np.ndarray]:
    def read() -> np.ndarray:
        t = tensor.detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits.
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()
    return read


def refuse_url(path: str | os.PathLike, why: str, *, key: str | None = None) -> None:
    """Raises a one-line `UserError` if `path` is a URL, saying `why` it must be local and what to do.

    Example:
        >>> refuse_url("gs://b/bert.safetensors", "weights files are read from a local disk")
        Traceback (most recent call last):
        UserError: gs://b/bert.safetensors is a URL, but weights files are read from a local disk; ...
    """
    text = os.fspath(path)
    if "://" in text:
        where = f"{key}={text}" if key else text
        raise UserError(f"{where} is a URL, but {why}; copy it to a local disk first (gsutil cp -r / "
                        "aws s3 cp --recursive) and pass the local path.")
