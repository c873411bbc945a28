"""``shoal bench swap``: same-architecture swap vs fresh engine vs memcpy.

One run, one machine, ratios within the run:
- ``fresh_start_s``: a new vLLM engine for the ~100 MB model;
- ``swap_s_p50``: median warm in-place swap between the ~100 MB pair, fed
  from the host weight cache (tmpfs), prefix-cache reset included: the exact
  code path the engine worker uses (``EngineShell.swap_in``). "Warm" means
  the shell has served that model before, so on CPU it takes the PREPARED
  path (``cluster/engine/cpu_weight_swap.py``); ``swap_paths`` counts the paths;
- ``first_swap_s``: each model's first swap into the shell (RELOAD path:
  vLLM's ``reload_weights`` plus keeping the result prepared), not in p50;
- ``reload_swap_s_p50``: the same swaps forced through ``reload_weights``
  alone (``use_prepared=False``): the swap before prepared weights existed;
- ``prepared``: what a PREPARED swap moves: ``copied_bytes`` are copied
  (plain tensors), ``kernel_bytes`` are packed linear kernels re-pointed by
  reference, not copied, and held in engine RAM per parked model;
- ``tmpfs_feed_s_p50``: the feed part alone: tensors materialized from tmpfs;
- ``objstore_feed_lower_bound_s_p50``: the alternative feed from the Ray
  object store, timed up to the point where it would still have to cross
  into vLLM's process (see ``_objstore_feed_lower_bound``);
- ``memcpy_gbps`` / ``memcpy_bound_s``: host copy bandwidth, measured here.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path

from cluster.catalog import ModelSpec
from cluster.engine.checkpoint import read_checkpoint
from cluster.engine.shell import PREPARED, RELOAD, EngineShell
from cluster.testing.tiny_models import make_test_models
from cluster.engine.weight_cache import HostWeightCache

PAIR = ("swap-llama-a", "swap-llama-b")


def measure_memcpy_gbps(nbytes: int, repeats: int = 7) -> float:
    """Median host-to-host copy bandwidth for a buffer of ``nbytes``."""
    import torch

    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in before timing
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times) / 1e9


def _load_tensors(checkpoint_dir: Path) -> dict:
    """All tensors of a single-file safetensors checkpoint, materialized."""
    from safetensors.torch import load_file

    return load_file(str(next(checkpoint_dir.glob("*.safetensors"))))


def _objstore_weights(path: Path):
    """Put a checkpoint's tensors in the object store as raw byte arrays."""
    import ray
    import torch

    return ray.put({k: v.view(torch.uint8).numpy() for k, v in _load_tensors(path).items()})


def _objstore_feed_lower_bound(ref) -> float:
    """Seconds for the object-store feed *before* any RPC: fetch + one copy.

    vLLM 0.32's ``collective_rpc`` decodes kwargs with msgspec and no tensor
    types, so tensors cannot be sent as ``reload_weights(weights_iterator=...)``
    (measured: "'list' object has no attribute 'dtype'") without enabling its
    insecure pickle serialization. Any working variant must at least fetch the
    arrays and copy them once to leave this process; that is timed here.
    """
    import ray
    import torch

    t0 = time.perf_counter()
    arrays = ray.get(ref)  # zero-copy views of the object store
    for a in arrays.values():
        torch.from_numpy(a).clone()
    return time.perf_counter() - t0


def _tmpfs_feed(cached_dir: Path) -> float:
    """Seconds to materialize a cached checkpoint's tensors from tmpfs.

    The same read vLLM's safetensors loader does inside the engine process;
    the feed half of ``swap_s`` (the rest is vLLM's load + CPU repacking).
    """
    t0 = time.perf_counter()
    _load_tensors(cached_dir)
    return time.perf_counter() - t0


async def _run(models_dir: Path, swaps: int) -> dict:
    import ray

    paths = make_test_models(models_dir, list(PAIR))
    specs = [ModelSpec(name=n, path=str(paths[n]), family="swap-llama").resolved() for n in PAIR]
    weights_bytes = specs[0].weights_bytes
    cache = HostWeightCache(owner="bench")
    try:
        cached = [cache.put(s.name, s.path) for s in specs]
        memcpy_gbps = measure_memcpy_gbps(weights_bytes)

        t0 = time.perf_counter()
        shell = await EngineShell.start("bench", specs[0], read_checkpoint(specs[0].path),
                                       sleep_mode=False, eager=True)
        fresh_start_s = time.perf_counter() - t0
        try:
            timed = []  # (seconds, path) in swap order
            for i in range(swaps):
                t = await shell.swap_in(PAIR[(i + 1) % 2], str(cached[(i + 1) % 2].dir))
                timed.append((t, shell.last_swap_path))
            reload_s = [await shell.swap_in(PAIR[(i + 1) % 2], str(cached[(i + 1) % 2].dir),
                                            use_prepared=False) for i in range(swaps)]
            prepared = shell.prepared_summary(PAIR[0])
            prepared_bytes = shell.prepared_bytes()
            ray.init(ignore_reinit_error=True, include_dashboard=False, num_cpus=1)
            refs = [_objstore_weights(Path(s.path)) for s in specs]
            obj_s = [_objstore_feed_lower_bound(refs[(i + 1) % 2]) for i in range(swaps)]
            tmpfs_s = [_tmpfs_feed(cached[(i + 1) % 2].dir) for i in range(swaps)]
        finally:
            shell.shutdown()
    finally:
        cache.close()
        ray.shutdown()
    warm = [t for t, path in timed if path == PREPARED]
    first = [t for t, path in timed if path != PREPARED]
    swap_p50 = statistics.median(warm or first)  # no warm swap: prepared swaps are off
    memcpy_bound_s = weights_bytes / (memcpy_gbps * 1e9)
    return {
        "bench": "swap",
        "models": list(PAIR),
        "weights_bytes": weights_bytes,
        "swaps": swaps,
        "swap_paths": {p: [path for _, path in timed].count(p) for p in (PREPARED, RELOAD)},
        "swap_s_p50": swap_p50,
        "swap_s_max": max(warm or first),
        "first_swap_s": first,
        "reload_swap_s_p50": statistics.median(reload_s),
        "prepared": prepared and {"copied_bytes": prepared["tensor_bytes"],
                                  "kernel_bytes": prepared["kernel_bytes"],
                                  "kernels": prepared["kernels"],
                                  "bytes_per_model": prepared_bytes},
        "tmpfs_feed_s_p50": statistics.median(tmpfs_s),
        "objstore_feed_lower_bound_s_p50": statistics.median(obj_s),
        "fresh_start_s": fresh_start_s,
        "memcpy_gbps": memcpy_gbps,
        "memcpy_bound_s": memcpy_bound_s,
        "swap_over_memcpy_bound": swap_p50 / memcpy_bound_s,
        "reload_swap_over_memcpy_bound": statistics.median(reload_s) / memcpy_bound_s,
        "fresh_over_swap": fresh_start_s / swap_p50,
        "targets": {"swap_s_p50 <= 3 x memcpy_bound_s": swap_p50 <= 3 * memcpy_bound_s,
                    "fresh_start_s / swap_s_p50 >= 100": fresh_start_s / swap_p50 >= 100},
    }


def run_swap_bench(models_dir: str | Path, swaps: int = 10) -> dict:
    # Swaps alternate A/B from a shell started with A: the first two are
    # each model's first visit (RELOAD), the rest are warm.
    return asyncio.run(_run(Path(models_dir), max(swaps, 3)))
