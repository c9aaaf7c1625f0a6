"""Open a source checkpoint directory: files, index, TP rank sub-directories, config, layout.

Handles the ways a Paddle or HF ERNIE-4.5 checkpoint is laid out on disk
(``shared/docs/wint2-format.md`` §1):

* a single ``model.safetensors`` (or any set of ``*.safetensors`` files without an index);
* shards plus ``model.safetensors.index.json`` (``weight_map``: tensor -> file);
* pre-sharded tensor-parallel releases: ``rank0/ ... rank{n-1}/``, each a checkpoint as above.

It detects the naming layout (Paddle ``ernie.``, ``[in, out]``; HF ``model.``, ``[out, in]``) and
parses ``config.json`` into :class:`jaxwint2.ErnieConfig`. Tensors are read one at a time on
request. It does not know what any tensor means; :mod:`converters.keymap` does.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
from typing import Literal

import numpy as np

from jaxwint2.config import ConfigError, ErnieConfig

from .errors import CheckpointError
from .safetensors_io import SafetensorsFile, TensorInfo, read_tensor

Layout = Literal["paddle", "hf"]
INDEX_FILE = "model.safetensors.index.json"
_RANK_DIR = re.compile(r"^rank(\d+)$")


class TensorSource:
    """The tensors of one (rank's) checkpoint: name -> :class:`TensorInfo`, read lazily.

    Example:
      >>> src = TensorSource("ckpt/")  # doctest: +SKIP
      >>> x = src.read("ernie.layers.0.self_attn.qkv_proj.quant_weight")  # doctest: +SKIP
    """

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        self.tensors: dict[str, TensorInfo] = {}
        self.reads = 0
        self.bytes_read = 0
        index = self.path / INDEX_FILE
        if index.exists():
            self._open_index(index)
        else:
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{self.path}: no *.safetensors files and no {INDEX_FILE}")
            for f in files:
                self._add_file(SafetensorsFile(f))

    def _open_index(self, index: pathlib.Path) -> None:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: unreadable index ({e!r})") from e
        by_file: dict[str, list[str]] = {}
        for name, fname in weight_map.items():
            by_file.setdefault(fname, []).append(name)
        for fname, names in sorted(by_file.items()):
            fpath = self.path / fname
            if not fpath.exists():
                raise CheckpointError(f"{index}: tensor {names[0]!r} is mapped to missing file "
                                      f"{fpath}")
            f = SafetensorsFile(fpath)
            for name in names:
                if name not in f.tensors:
                    raise CheckpointError(f"{fpath}: tensor {name!r} listed in {INDEX_FILE} is "
                                          "not in the file")
            self._add_file(f, only=set(names))

    def _add_file(self, f: SafetensorsFile, only: set[str] | None = None) -> None:
        for name, info in f.tensors.items():
            if only is not None and name not in only:
                continue
            if name in self.tensors:
                raise CheckpointError(f"{f.path}: tensor {name!r} also in "
                                      f"{self.tensors[name].file}")
            self.tensors[name] = info

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def keys(self) -> list[str]:
        return list(self.tensors)

    def info(self, name: str) -> TensorInfo:
        return self.tensors[name]

    def read(self, name: str) -> np.ndarray:
        t = self.tensors[name]
        self.reads += 1
        self.bytes_read += t.nbytes
        return read_tensor(t)

    def where(self, name: str) -> str:
        """``"<file>: tensor '<name>'"``, for error messages."""
        t = self.tensors.get(name)
        return f"{t.file if t else self.path}: tensor {name!r}"


@dataclasses.dataclass
class SourceCheckpoint:
    """A source checkpoint directory: its config, layout, and one :class:`TensorSource` per rank."""

    path: pathlib.Path
    config_dict: dict
    config: ErnieConfig
    layout: Layout
    ranks: list[TensorSource]

    @property
    def tp_size(self) -> int:
        return len(self.ranks)

    @property
    def source_format(self) -> str:
        quant = "quantized" if self.config_dict.get("quantization_config") else "bf16"
        tp = f"-tp{self.tp_size}" if self.tp_size > 1 else ""
        return f"{self.layout}-{quant}{tp}"

    def keys(self) -> list[str]:
        return self.ranks[0].keys()

    @property
    def reads(self) -> int:
        return sum(r.reads for r in self.ranks)

    @property
    def bytes_read(self) -> int:
        return sum(r.bytes_read for r in self.ranks)


def rank_dirs(path: pathlib.Path) -> list[pathlib.Path]:
    """``rank0 .. rank{n-1}`` sub-directories in order (empty if none); gaps are an error."""
    found = {}
    for p in path.iterdir() if path.is_dir() else ():
        m = _RANK_DIR.match(p.name)
        if m and p.is_dir():
            found[int(m.group(1))] = p
    if found and sorted(found) != list(range(len(found))):
        raise CheckpointError(f"{path}: rank directories {sorted(found)} are not rank0..rank"
                              f"{len(found) - 1}")
    return [found[r] for r in range(len(found))]


def read_config(path: pathlib.Path, search: list[pathlib.Path]) -> tuple[dict, ErnieConfig]:
    """The first ``config.json`` among ``search``, parsed (FastDeploy quantization semantics)."""
    for d in search:
        f = d / "config.json"
        if f.exists():
            break
    else:
        raise CheckpointError(f"{path}: no config.json")
    try:
        raw = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{f}: unreadable config ({e})") from e
    try:
        return raw, ErnieConfig.from_hf_config(raw)
    except (ConfigError, TypeError, ValueError) as e:
        raise CheckpointError(f"{f}: {e}") from e


def detect_layout(names: list[str], where: pathlib.Path) -> Layout:
    if any(n.startswith("ernie.") for n in names):
        return "paddle"
    if any(n.startswith("model.") for n in names):
        return "hf"
    raise CheckpointError(f"{where}: neither Paddle ('ernie.*') nor HF ('model.*') tensor names "
                          f"(first: {names[:3]})")


def open_checkpoint(path: str | os.PathLike) -> SourceCheckpoint:
    """Open a Paddle / HF / rank-sharded checkpoint directory (headers only, no tensor data).

    Raises:
      CheckpointError: unreadable index or config, truncated or corrupt files (names the file and,
        where there is one, the tensor).
    """
    path = pathlib.Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory")
    ranks = rank_dirs(path)
    dirs = ranks or [path]
    raw, cfg = read_config(path, [path, *ranks])
    sources = [TensorSource(d) for d in dirs]
    layout = detect_layout(sources[0].keys(), dirs[0])
    if layout == "hf" and len(sources) > 1:
        raise CheckpointError(f"{path}: rank directories of an HF checkpoint are not supported")
    return SourceCheckpoint(path=path, config_dict=raw, config=cfg, layout=layout, ranks=sources)
