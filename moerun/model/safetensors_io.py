"""Zero-copy safetensors reading (mmap) and streaming writing, tensor by tensor.

The file format: u64 little-endian header length N, N bytes of JSON
{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then the data,
offsets relative to byte 8 + N. Our own reader lets loading keep one copy of every weight (the
page cache's) and name the exact tensor a truncated file lacks; our writer lets `moerun synth`
write a full-size checkpoint without holding it in RAM.
"""

import json
import math
import mmap
import os
import struct
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple

import torch

from moerun.errors import CheckpointError

DTYPES: dict[str, torch.dtype] = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class TensorSpec(NamedTuple):
    name: str
    dtype: str  # safetensors dtype name, e.g. "BF16", "U8"
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize


class SafetensorsFile:
    """One .safetensors file, memory-mapped copy-on-write; tensors are views of the map."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.specs, self._data_start = self._read_header()
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            # ACCESS_COPY: private pages, so torch gets a writable buffer without touching the file
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size else None
        for name, (spec, (begin, end)) in self.specs.items():
            if end - begin != spec.nbytes:
                raise CheckpointError(
                    f"{self.path}: tensor {name} {spec.dtype}{list(spec.shape)} needs "
                    f"{spec.nbytes} bytes but its data_offsets span {end - begin}"
                )
            if self._data_start + end > size:
                raise CheckpointError(
                    f"{self.path} is truncated: tensor {name} ends at byte "
                    f"{self._data_start + end} but the file has {size} bytes"
                )

    def _read_header(self) -> tuple[dict[str, tuple[TensorSpec, tuple[int, int]]], int]:
        try:
            with open(self.path, "rb") as f:
                raw_len = f.read(8)
                if len(raw_len) < 8:
                    raise CheckpointError(f"{self.path} is truncated: no safetensors header")
                (n,) = struct.unpack("<Q", raw_len)
                if n > 100 * 2**20:
                    raise CheckpointError(f"{self.path} is not a safetensors file (header {n} B)")
                header = f.read(n)
            if len(header) < n:
                raise CheckpointError(f"{self.path} is truncated inside its header")
            meta = json.loads(header)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"cannot read {self.path} as safetensors: {e}") from None
        if not isinstance(meta, dict):
            raise CheckpointError(f"{self.path}: malformed safetensors header (not a JSON object)")
        specs = {}
        for name, info in meta.items():
            if name != "__metadata__":
                specs[name] = self._parse_entry(name, info)
        return specs, 8 + n

    def _parse_entry(self, name: str, info: object) -> tuple[TensorSpec, tuple[int, int]]:
        def is_ints(v: object, n: int | None = None) -> bool:
            ok = isinstance(v, list) and all(isinstance(x, int) and x >= 0 for x in v)
            return ok and (n is None or len(v) == n)

        if not isinstance(info, dict):
            raise CheckpointError(f"{self.path}: malformed safetensors header entry for {name}")
        if info.get("dtype") not in DTYPES:
            raise CheckpointError(
                f"{self.path}: tensor {name} has unsupported dtype {info.get('dtype')}"
            )
        offsets, shape = info.get("data_offsets"), info.get("shape")
        if not is_ints(offsets, 2) or offsets[0] > offsets[1] or not is_ints(shape):
            raise CheckpointError(
                f"{self.path}: tensor {name} has malformed shape or data_offsets in the header"
            )
        return TensorSpec(name, info["dtype"], tuple(shape)), (offsets[0], offsets[1])

    def names(self) -> list[str]:
        return list(self.specs)

    def release(self, name: str) -> None:
        """Drop the tensor's pages from this process (they stay in the page cache and are read
        again if touched): for weights converted at load (8-bit dense weights), so that their
        source stops counting in the RSS. Only whole pages inside the tensor are released."""
        _, (begin, end) = self.specs[name]
        page = mmap.PAGESIZE
        start = -(-(self._data_start + begin) // page) * page
        stop = (self._data_start + end) // page * page
        if self._map is not None and stop > start:
            self._map.madvise(mmap.MADV_DONTNEED, start, stop - start)

    def spec(self, name: str) -> TensorSpec:
        return self.specs[name][0]

    def tensor(self, name: str) -> torch.Tensor:
        spec, (begin, end) = self.specs[name]
        dtype = DTYPES[spec.dtype]
        offset = self._data_start + begin
        if spec.nbytes == 0:
            return torch.empty(spec.shape, dtype=dtype)
        if offset % dtype.itemsize:  # unaligned: frombuffer cannot view it, copy this one
            raw = torch.frombuffer(self._map, dtype=torch.uint8, count=end - begin, offset=offset)
            return raw.clone().view(dtype).view(spec.shape)
        flat = torch.frombuffer(self._map, dtype=dtype, count=math.prod(spec.shape), offset=offset)
        return flat.view(spec.shape)


def write_safetensors(
    path: str | Path,
    specs: Iterable[TensorSpec],
    produce: Callable[[TensorSpec], torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> int:
    """Write tensors in `specs` order, asking `produce` for one at a time. Returns bytes written."""
    specs = list(specs)
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for spec in specs:
        header[spec.name] = {"dtype": spec.dtype, "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}  # fmt: skip
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    tmp = Path(str(path) + ".partial")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for spec in specs:
            t = produce(spec)
            if tuple(t.shape) != spec.shape or t.dtype != DTYPES[spec.dtype]:
                raise ValueError(f"{spec.name}: produced {t.dtype}{list(t.shape)}, expected {spec}")
            f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
    tmp.rename(path)
    return 8 + len(raw) + offset
