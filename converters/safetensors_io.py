"""Raw safetensors files: parse the header ourselves, read one tensor, stream-write a file.

Why not only ``safetensors.safe_open``: its NumPy frontend cannot return bf16, Paddle writes bf16
under a ``U16`` header, and a truncated file should fail with the name of the tensor that runs
past its end. This module reads the header JSON, checks every tensor's byte range against the file
size when the file is opened, and reads one tensor at a time with a seek (never the whole file).
``BF16`` tensors come back as ``ml_dtypes.bfloat16``; ``U16`` ones as ``uint16`` (the caller,
which knows a tensor is a float, reinterprets the bits, see :func:`as_float`).

The writer streams tensors into a data file and prepends the header at the end, so a multi-GB
file is written with one tensor in memory. It can declare bf16 tensors as ``BF16`` or ``U16``.

Knows nothing about models, names or layouts.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import struct
from typing import Any

import ml_dtypes
import numpy as np

from .errors import CheckpointError

DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_), "U8": np.dtype(np.uint8), "I8": np.dtype(np.int8),
    "U16": np.dtype(np.uint16), "I16": np.dtype(np.int16), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "U32": np.dtype(np.uint32),
    "I32": np.dtype(np.int32), "F32": np.dtype(np.float32), "U64": np.dtype(np.uint64),
    "I64": np.dtype(np.int64), "F64": np.dtype(np.float64),
}
_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 2**20


class TensorInfo:
    """Declared dtype (safetensors name, e.g. ``"BF16"``), shape and byte range of one tensor."""

    __slots__ = ("name", "dtype", "shape", "begin", "end", "file")

    def __init__(self, name: str, dtype: str, shape: tuple[int, ...], begin: int, end: int,
                 file: pathlib.Path):
        self.name, self.dtype, self.shape = name, dtype, shape
        self.begin, self.end, self.file = begin, end, file

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    def __repr__(self) -> str:
        return f"{self.name}: {self.dtype} {list(self.shape)}"


class SafetensorsFile:
    """One ``.safetensors`` file, header parsed and validated on open; tensors read lazily.

    Example:
      >>> f = SafetensorsFile("model-00001-of-00002.safetensors")  # doctest: +SKIP
      >>> f.info("ernie.norm.weight").dtype, f.read("ernie.norm.weight").shape  # doctest: +SKIP
    """

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        self.metadata: dict[str, str] = {}
        self.tensors: dict[str, TensorInfo] = {}
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise CheckpointError(f"{self.path}: truncated safetensors file "
                                          f"({size} bytes, no header)")
                (n,) = struct.unpack("<Q", head)
                if n > _MAX_HEADER or 8 + n > size:
                    raise CheckpointError(f"{self.path}: corrupt or truncated safetensors header "
                                          f"(declares {n} header bytes, file has {size})")
                raw = f.read(n)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read safetensors file ({e})") from e
        try:
            header = json.loads(raw)
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
        except ValueError as e:
            raise CheckpointError(f"{self.path}: corrupt safetensors header ({e})") from e
        base = 8 + n
        for name, d in header.items():
            if name == "__metadata__":
                self.metadata = dict(d or {})
                continue
            try:
                dtype, shape = d["dtype"], tuple(int(s) for s in d["shape"])
                begin, end = (int(o) for o in d["data_offsets"])
            except (KeyError, TypeError, ValueError) as e:
                raise CheckpointError(f"{self.path}: corrupt header entry for tensor {name!r} "
                                      f"({e!r})") from e
            if dtype not in DTYPES:
                raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype "
                                      f"{dtype!r}")
            want = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].itemsize
            if end - begin != want or begin < 0:
                raise CheckpointError(f"{self.path}: tensor {name!r} {dtype} {list(shape)} "
                                      f"needs {want} bytes, header gives [{begin}, {end})")
            if base + end > size:
                raise CheckpointError(f"{self.path}: truncated: tensor {name!r} ends at byte "
                                      f"{base + end} but the file has {size} bytes")
            self.tensors[name] = TensorInfo(name, dtype, shape, base + begin, base + end,
                                            self.path)

    def keys(self) -> list[str]:
        return list(self.tensors)

    def info(self, name: str) -> TensorInfo:
        return self.tensors[name]

    def read(self, name: str) -> np.ndarray:
        """Read one tensor (a fresh array; ``BF16`` as bfloat16, ``U16`` as uint16)."""
        return read_tensor(self.tensors[name])


def read_tensor(t: TensorInfo) -> np.ndarray:
    """Read the bytes of one tensor with a seek; the file is not mapped or read whole."""
    dtype = DTYPES[t.dtype]
    count = t.nbytes // dtype.itemsize
    try:
        with open(t.file, "rb") as f:
            f.seek(t.begin)
            data = np.fromfile(f, dtype=np.uint8, count=t.nbytes)
    except OSError as e:
        raise CheckpointError(f"{t.file}: cannot read tensor {t.name!r} ({e})") from e
    if data.size != t.nbytes:
        raise CheckpointError(f"{t.file}: truncated: tensor {t.name!r} is short by "
                              f"{t.nbytes - data.size} bytes")
    return data.view(dtype)[:count].reshape(t.shape)


def as_float(x: np.ndarray, *, what: str) -> np.ndarray:
    """A float tensor as stored: ``U16`` bit patterns become bf16 (a view, never a value cast)."""
    if x.dtype == np.uint16:
        return x.view(ml_dtypes.bfloat16)
    if x.dtype in (np.float32, np.float16, np.float64) or x.dtype == ml_dtypes.bfloat16:
        return x
    raise CheckpointError(f"{what}: expected a float tensor (BF16/U16/F16/F32), got {x.dtype}")


class SafetensorsWriter:
    """Stream tensors into one ``.safetensors`` file with bounded memory.

    Data go to ``<path>.data`` as they are added; :meth:`close` writes the header and appends the
    data. bf16 arrays are declared ``bf16_header`` (``"BF16"`` or Paddle's ``"U16"``).

    Example:
      >>> with SafetensorsWriter("x.safetensors", bf16_header="U16") as w:  # doctest: +SKIP
      ...     w.add("ernie.norm.weight", np.ones(8, ml_dtypes.bfloat16))
    """

    def __init__(self, path: str | os.PathLike, *, bf16_header: str = "BF16",
                 metadata: dict[str, str] | None = None):
        if bf16_header not in ("BF16", "U16"):
            raise ValueError(f"bf16_header must be 'BF16' or 'U16', got {bf16_header!r}")
        self.path = pathlib.Path(path)
        self.bf16_header = bf16_header
        self.metadata = dict(metadata or {"format": "np"})
        self._header: dict[str, Any] = {}
        self._offset = 0
        self._data_path = self.path.with_name(self.path.name + ".data")
        self._data = open(self._data_path, "wb")  # noqa: SIM115 (closed in close())

    def add(self, name: str, array: np.ndarray) -> None:
        if name in self._header:
            raise ValueError(f"duplicate tensor {name!r} in {self.path}")
        a = np.ascontiguousarray(array)
        dtype = _NAMES.get(a.dtype)
        if dtype is None:
            raise TypeError(f"{name}: dtype {a.dtype} has no safetensors name")
        if dtype == "BF16":
            dtype = self.bf16_header
        self._header[name] = {"dtype": dtype, "shape": list(a.shape),
                              "data_offsets": [self._offset, self._offset + a.nbytes]}
        a.reshape(-1).view(np.uint8).tofile(self._data)
        self._offset += a.nbytes

    def close(self) -> None:
        self._data.close()
        header = {"__metadata__": self.metadata, **self._header}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format pads the header to 8-byte alignment
        with open(self.path, "wb") as out, open(self._data_path, "rb") as data:
            out.write(struct.pack("<Q", len(raw)))
            out.write(raw)
            shutil.copyfileobj(data, out, 16 * 2**20)
        self._data_path.unlink()

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._data.close()
            self._data_path.unlink(missing_ok=True)
