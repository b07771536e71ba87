"""safetensors files written and read in pieces, without holding a file's tensors in memory.

The format is safetensors' own (an 8-byte little-endian header length, a JSON header naming
each tensor's dtype, shape and byte range in the data section, then the data), so
``safetensors.safe_open`` and ``load_file`` read these files, and these functions read
files written by ``safetensors.torch.save_file``.

- ``write_tensors`` streams one tensor at a time from its own memory to the file: no
  serialised copy of the file, and views into one buffer (ZeRO partitions) are written as
  they are. Peak extra memory is the largest tensor that is not contiguous on the CPU.
- ``read_header`` parses a header; ``read_range`` reads elements [lo, hi) of one stored tensor
  (row-major, whatever its shape) straight into a destination tensor: only those bytes.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Iterable, Optional

import torch

DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}
TORCH_DTYPES = {v: k for k, v in DTYPES.items()}
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit


class HeaderError(ValueError):
    """A safetensors header that cannot be read: the message names the file."""


def write_tensors(path: str | os.PathLike, specs: list[tuple[str, tuple, torch.dtype]],
                  tensors: Iterable[torch.Tensor], metadata: Optional[dict] = None) -> int:
    """Write a safetensors file at ``path`` (fsynced, the plain ``open()`` mode); return its size.

    ``specs`` gives each tensor's (name, shape, dtype) for the header; ``tensors`` then yields
    the tensors in that order, each written from its own memory and dropped before the next is
    asked for (a generator may read or convert them one at a time)."""
    header, offset = {}, 0
    for name, shape, dtype in specs:
        if dtype not in DTYPES:
            raise TypeError(f"{path}: tensor {name} has dtype {dtype}, which megasink does not write "
                            f"(allowed: {', '.join(map(str, DTYPES))})")
        nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        header[name] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        it = iter(tensors)
        for name, shape, dtype in specs:
            t = next(it).detach()
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise ValueError(f"{path}: tensor {name} is {tuple(t.shape)} {t.dtype}, its header says "
                                 f"{tuple(shape)} {dtype}")
            if t.numel():
                t = t.to("cpu").contiguous()  # no copy for a contiguous CPU tensor (or view)
                f.write(memoryview(t.view(-1).view(torch.uint8).numpy()))
            del t
        f.flush()
        os.fsync(f.fileno())
    return 8 + len(raw) + offset


def read_header(f) -> tuple[dict, int]:
    """(header without ``__metadata__``, byte offset of the data section) of an open safetensors
    file; HeaderError when the header is cut short or does not parse."""
    name = getattr(f, "name", "<file>")
    f.seek(0)
    head = f.read(8)
    size = os.fstat(f.fileno()).st_size
    n = int.from_bytes(head, "little") if len(head) == 8 else -1
    if n < 0 or 8 + n > size or n > MAX_HEADER_BYTES:
        raise HeaderError(f"{name} is truncated ({size} bytes; its header does not fit)")
    try:
        header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        for v in header.values():
            begin, end = (int(x) for x in v["data_offsets"])
            if v["dtype"] not in TORCH_DTYPES or end < begin:
                raise ValueError(f"bad entry {v}")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise HeaderError(f"{name}: the safetensors header does not parse ({type(e).__name__}: {e})") from None
    return header, 8 + n


def data_end(header: dict) -> int:
    """Bytes of the data section that ``header`` describes."""
    return max((int(v["data_offsets"][1]) for v in header.values()), default=0)


def read_range(f, entry: dict, data_start: int, lo: int, out: torch.Tensor) -> None:
    """Read elements [lo, lo + out.numel()) of the (row-major, flattened) tensor ``entry`` of the
    open file ``f`` (opened unbuffered) into the contiguous tensor ``out`` of the same dtype."""
    item = out.element_size()
    pos = data_start + int(entry["data_offsets"][0]) + lo * item
    view = memoryview(out.view(-1).view(torch.uint8).numpy())
    f.seek(pos)
    done = 0
    while done < len(view):
        got = f.readinto(view[done:])
        if not got:
            raise HeaderError(f"{getattr(f, 'name', '<file>')}: ends inside a tensor (at byte {pos + done})")
        done += got


def open_unbuffered(path: Path):
    return open(path, "rb", buffering=0)
