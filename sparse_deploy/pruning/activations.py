"""Where the calibration activations live between blocks: [nsamples, seqlen, hidden] in the compute dtype, read
and written one window at a time.

``RamActivations`` holds them in one tensor (on the CPU or the solver's device); ``FileActivations`` keeps them
in a raw file (C order, native byte order) and reads and writes one window per call, so the process holds one
window, not the set. Both give the same values: the file holds the tensor's bytes exactly.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch


class Activations:
    """The interface of both stores: ``len`` windows of ``shape`` in ``dtype``."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, j: int, device: torch.device) -> torch.Tensor:  # [1, seqlen, hidden]
        raise NotImplementedError

    def write(self, j: int, value: torch.Tensor) -> None:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        return _numel(self.shape) * self.dtype.itemsize


class RamActivations(Activations):
    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor
        self.shape = tuple(tensor.shape)
        self.dtype = tensor.dtype

    def read(self, j: int, device: torch.device) -> torch.Tensor:
        return self.tensor[j : j + 1].to(device)

    def write(self, j: int, value: torch.Tensor) -> None:
        self.tensor[j : j + 1] = value

    def save(self, path: Path) -> None:
        """Write the tensor's bytes to ``path`` durably (a temporary name, fsync, rename)."""
        tmp = path.with_name(path.name + ".tmp")
        data = self.tensor.detach().cpu().contiguous().view(torch.uint8).numpy()
        with open(tmp, "wb") as fh:
            for j in range(self.shape[0]):  # window by window: no second copy of the set
                fh.write(memoryview(data[j]))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> RamActivations:
        tensor = torch.empty(shape, dtype=dtype, device="cpu")
        view = tensor.view(torch.uint8).numpy()
        with open(path, "rb") as fh:
            for j in range(shape[0]):
                fh.readinto(memoryview(view[j]))
        return cls(tensor.to(device))


class FileActivations(Activations):
    """A raw file of [nsamples, seqlen, hidden] values; window j sits at byte j · (seqlen · hidden · itemsize)."""

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: torch.dtype, create: bool = False):
        self.path = Path(path)
        self.shape = tuple(shape)
        self.dtype = dtype
        self.window_bytes = _numel(self.shape[1:]) * dtype.itemsize
        if create:
            with open(self.path, "wb") as fh:
                fh.truncate(self.nbytes)
        elif self.path.stat().st_size != self.nbytes:
            raise ValueError(f"{self.path} holds {self.path.stat().st_size} bytes, expected {self.nbytes}")
        self._fd = os.open(self.path, os.O_RDWR)

    def read(self, j: int, device: torch.device) -> torch.Tensor:
        data = bytearray(self.window_bytes)
        view = memoryview(data)
        done = 0
        while done < self.window_bytes:
            got = os.preadv(self._fd, [view[done:]], j * self.window_bytes + done)
            if got <= 0:
                raise OSError(f"short read from {self.path}")
            done += got
        return torch.frombuffer(data, dtype=self.dtype).view(1, *self.shape[1:]).to(device)

    def write(self, j: int, value: torch.Tensor) -> None:
        data = value.detach().to(device="cpu", dtype=self.dtype).contiguous().view(torch.uint8).numpy()
        if data.nbytes != self.window_bytes:
            raise ValueError(f"window of {data.nbytes} bytes written to {self.path}, expected {self.window_bytes}")
        view = memoryview(data.reshape(-1))
        done = 0
        while done < self.window_bytes:
            done += os.pwrite(self._fd, view[done:], j * self.window_bytes + done)

    def sync(self) -> None:
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self):
        self.close()


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n
