"""``shoal demo`` / ``make run``: the engine worker on an embedded default.

Local Ray, tiny generated models, one CPU device: load one model, stream
from it, swap a same-architecture model in place, stream again, and show
the worker's stats. (Becomes ``shoal up --demo`` once the front door lands.)
"""

from __future__ import annotations

import json
import time
from pathlib import Path

DEMO_DIR = Path(".shoal/models")
PROMPT = "The tide comes in twice a day and the boats"


def _stream(worker, model: str) -> list[int]:
    import ray

    ids: list[int] = []
    print(f"  {model}: ", end="", flush=True)
    for ref in worker.generate.remote(model, prompt=PROMPT,
                                      sampling={"max_tokens": 24, "temperature": 0}):
        chunk = ray.get(ref)
        ids += chunk["token_ids"]
        print(chunk["text"].encode("unicode_escape").decode(), end="", flush=True)
    print(f"  [{len(ids)} tokens]")
    return ids


def run_demo(models_dir: Path = DEMO_DIR) -> None:
    import ray

    from cluster.catalog import ModelSpec
    from cluster.device import DeviceSpec
    from cluster.engine_worker import start_engine_worker
    from cluster.tiny_models import make_test_models

    names = ["tiny-llama-a", "tiny-llama-b", "tiny-llama-c"]
    paths = make_test_models(models_dir, names)
    ray.init(include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"VLLM_LOGGING_LEVEL": "WARNING"}})
    worker = start_engine_worker(DeviceSpec("cpu0", "cpu", 2 * 2**30))
    specs = [ModelSpec(name=n, path=str(paths[n].resolve()), family="tiny-llama") for n in names]
    t0 = time.perf_counter()
    ray.get(worker.load.remote(specs[0]))
    print(f"fresh engine for {names[0]}: {time.perf_counter() - t0:.1f} s")
    for s in specs[1:]:
        ray.get(worker.load.remote(s, park=True))  # host cache only
    for name in names:
        status = ray.get(worker.swap.remote(name))
        print(f"swap -> {name}: {status['last_swap_s'] or 0.0:.3f} s in place")
        _stream(worker, name)
    print(json.dumps(ray.get(worker.stats.remote()), indent=2))
    ray.get(worker.shutdown.remote())
    ray.shutdown()
