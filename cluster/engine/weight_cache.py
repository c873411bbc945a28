"""Host-memory weight cache: each checkpoint is read from disk once.

The cache holds a copy of a model's safetensors files in tmpfs (``/dev/shm``).
A swap then hands vLLM a *path* into that tmpfs and vLLM's own loader mmaps it:
the bytes go from host RAM straight into the engine's parameters with one
copy, inside the engine process, and never touch the disk or a socket.

Why shared memory and not the Ray object store: vLLM's engine core runs in a
child process that is not a Ray worker, so object-store data would have to be
fetched by the actor and pushed through vLLM's RPC socket (serialize, send,
deserialize, then copy into the parameters): at least two extra copies of
every byte, and vLLM 0.32's RPC cannot even carry tensors as kwargs without
its insecure pickle mode. ``shoal bench swap`` times both in one run:
``swap_s_p50`` is the whole tmpfs swap, ``objstore_feed_lower_bound_s_p50``
only the object-store fetch plus the one copy it cannot avoid.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from cluster.errors import CheckpointError

SHM_ROOT = Path(os.environ.get("SHOAL_SHM_DIR", "/dev/shm"))
WEIGHT_FILE_GLOBS = ("*.safetensors", "*.safetensors.index.json")


@dataclass(frozen=True)
class CachedWeights:
    name: str  # catalog model name
    dir: Path  # tmpfs directory vLLM's loader can read
    weights_bytes: int  # bytes held in host memory for this model


class HostWeightCache:
    """Per-worker tmpfs cache, removed when the worker shuts down."""

    def __init__(self, owner: str):
        _sweep_dead_caches()
        self.root = SHM_ROOT / f"shoal-{os.getpid()}-{owner}-{uuid.uuid4().hex[:8]}"
        self.root.mkdir(parents=True, exist_ok=False)
        self._entries: dict[str, CachedWeights] = {}

    def put(self, name: str, checkpoint_dir: str | Path) -> CachedWeights:
        """Copy a checkpoint's weight files into host memory (idempotent)."""
        if name in self._entries:
            return self._entries[name]
        src = Path(checkpoint_dir)
        files = [f for g in WEIGHT_FILE_GLOBS for f in sorted(src.glob(g))]
        if not any(f.suffix == ".safetensors" for f in files):
            raise CheckpointError(f"{src}: no *.safetensors weights to cache")
        dst = self.root / name.replace("/", "--")
        tmp = dst.with_name(dst.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for f in files:
            shutil.copyfile(f, tmp / f.name)
        tmp.rename(dst)  # a half-copied model is never visible
        size = sum(f.stat().st_size for f in dst.iterdir())
        entry = CachedWeights(name, dst, size)
        self._entries[name] = entry
        return entry

    def get(self, name: str) -> CachedWeights | None:
        return self._entries.get(name)

    def drop(self, name: str) -> None:
        entry = self._entries.pop(name, None)
        if entry is not None:
            shutil.rmtree(entry.dir, ignore_errors=True)

    @property
    def total_bytes(self) -> int:
        return sum(e.weights_bytes for e in self._entries.values())

    def names(self) -> list[str]:
        return sorted(self._entries)

    def close(self) -> None:
        self._entries.clear()
        shutil.rmtree(self.root, ignore_errors=True)


def _sweep_dead_caches() -> None:
    """Remove caches left in tmpfs by workers that died without ``close``.

    tmpfs is RAM: a crashed worker's cache would otherwise hold host memory
    until reboot. The owning pid is part of each cache's directory name.
    """
    for d in SHM_ROOT.glob("shoal-*-*"):
        pid = d.name.split("-")[1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        pass
    return True
