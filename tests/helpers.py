"""Small helpers shared by the integration tests."""

from __future__ import annotations

import re
import time
from pathlib import Path

LONG_PROMPT = ("Shoal serves many language models from one shared pool of accelerators. "
               "Most models in a large catalog are cold and share devices.")
# More than two KV blocks (vLLM's CPU block size is 128 tokens): only a
# prompt with a full block can be served from the prefix cache, so only such
# a prompt shows whether the cache was reset on a swap.
CACHED_PROMPT = " ".join([LONG_PROMPT] * 6)
GREEDY = {"temperature": 0.0, "max_tokens": 20}


def collect(gen) -> tuple[list[int], list[dict]]:
    """Drain a worker stream: (all generated token ids, chunks)."""
    import ray

    chunks = [ray.get(ref) for ref in gen]
    return [t for c in chunks for t in c["token_ids"]], chunks


def wait_until(pred, timeout_s: float = 30.0, every_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"condition not met within {timeout_s} s")


def measured_device(name: str, prefill_fixed_s: float, prefill_per_token_s: float,
                    decode_step_s_by_batch: dict[int, float], swap_s: float):
    """A simulator device profile with measured engine times (as `shoal
    profile` writes one), its datasheet figures placeholders."""
    from cluster.sim.profiles import DeviceProfile, MeasuredEngine

    return DeviceProfile(
        name=name, vendor="cpu", accelerator_type=None, memory_bytes=8 * 2**30,
        memory_bandwidth_bytes_per_s=1e10, dense_flops_per_s=1e11, host_link_bytes_per_s=1e10,
        cost_per_hour=0.0,
        measured=MeasuredEngine(model="tiny", weights_bytes=10**6,
                                prefill_fixed_s=prefill_fixed_s,
                                prefill_per_token_s=prefill_per_token_s,
                                decode_step_s_by_batch=decode_step_s_by_batch, swap_s=swap_s,
                                fresh_engine_s=30.0))


def exported_metric_names(text: str) -> set[str]:
    """Every series name a Prometheus text scrape exports, declared families
    without samples yet included (a counter ``x`` exports ``x_total``, a
    histogram ``x_bucket``, ``x_sum`` and ``x_count``)."""
    from prometheus_client.parser import text_string_to_metric_families

    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
                "summary": ("_sum", "_count", "")}
    names = set()
    for f in text_string_to_metric_families(text):
        names |= {f.name + s for s in suffixes.get(f.type, ("",))}
        names |= {s.name for s in f.samples}
    return names


def session_log_files() -> list[Path]:
    """Every log file of this Ray session (all nodes of the test cluster)."""
    import ray

    root = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    return [p for p in root.rglob("*") if p.is_file()]


def request_events(request_id: str) -> list[dict[str, str]]:
    """The ``shoal.request`` lines (``cluster/request_log.py``) in the
    session's logs whose request id contains ``request_id``, parsed."""
    out = []
    for f in session_log_files():
        for line in f.read_text(errors="replace").splitlines():
            if "event=" in line and request_id in line:
                fields = dict(re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)', line))
                if request_id in fields.get("request_id", ""):
                    out.append(fields)
    return out
