"""What the engines would refuse about a catalog, found when it is loaded.

``load_catalog`` checks the schema alone: it runs wherever a catalog is read
(the simulator, tests with made-up paths, the demo before it writes its
checkpoints). ``check_catalog`` adds what only the checkpoints on disk and
vLLM can say, once, where an app is built (``serve_apps.app.load_app_catalog``:
``serve run``, ``shoal up``, the demo after it writes its checkpoints); the
Serve replicas and the controller get the checked catalog and do not repeat
it. Every problem names its field (``models.2.path``, ...), all at once:

- a path that is not a checkpoint (no directory, no config.json, no
  safetensors, an unreadable header);
- an architecture this vLLM cannot run;
- a family whose members could not swap into one engine (tensor names,
  shapes or dtypes, shape-fixing config keys, or the tokenizer differ);
- a model whose weights plus KV reservation exceed every device a catalog
  can describe.
"""

from __future__ import annotations

from cluster.catalog import Catalog, CatalogError
from cluster.engine.checkpoint import CheckpointInfo, read_checkpoint, swap_difference
from cluster.errors import CheckpointError


def check_catalog(cat: Catalog, source: str = "<catalog>") -> Catalog:
    """Raise CatalogError naming every field the engines would refuse;
    return ``cat`` unchanged otherwise."""
    problems: list[str] = []
    infos: dict[int, CheckpointInfo] = {}
    for i, m in enumerate(cat.models):
        try:
            infos[i] = read_checkpoint(m.path)
        except CheckpointError as e:
            problems.append(f"models.{i}.path: {e}")
    problems += _unsupported_architectures(cat, infos)
    problems += _mixed_families(cat, infos)
    problems += _too_big_for_every_device(cat)
    if problems:
        raise CatalogError("\n  ".join([f"invalid catalog {source}:", *problems]))
    return cat


def _unsupported_architectures(cat: Catalog, infos: dict[int, CheckpointInfo]) -> list[str]:
    if not infos:
        return []
    native = _vllm_architectures()
    out = []
    for i, info in sorted(infos.items()):
        if any(a in native for a in info.architectures):
            continue
        if _transformers_backend_can_run(info, cat.models[i].engine_args):
            continue
        out.append(f"models.{i}.path: architecture {info.architecture!r} (config.json "
                   f"'architectures') is not supported by this vLLM")
    return out


def _vllm_architectures() -> set[str]:
    # Lazy: vLLM takes seconds to import, and only app builders check.
    from vllm.model_executor.models import ModelRegistry

    return set(ModelRegistry.get_supported_archs())


def _transformers_backend_can_run(info: CheckpointInfo, engine_args: dict) -> bool:
    """vLLM falls back to its Transformers backend for an architecture it
    lacks natively when transformers has the class (model_impl auto or
    transformers), as ``ModelRegistry.resolve_model_cls`` does."""
    if engine_args.get("model_impl", "auto") not in ("auto", "transformers"):
        return False
    import transformers

    return getattr(transformers, info.architecture, None) is not None


def _mixed_families(cat: Catalog, infos: dict[int, CheckpointInfo]) -> list[str]:
    """Each family's members must swap into its first member's engine."""
    first: dict[str, int] = {}
    out = []
    for i, info in sorted(infos.items()):
        fam = cat.models[i].family
        j = first.setdefault(fam, i)
        if j == i or infos[j].swap_signature == info.swap_signature:
            continue
        why = swap_difference(infos[j].path, info.path) or "swap signatures differ"
        out.append(f"models.{i}.family: family {fam!r}: {cat.models[i].name!r} cannot share an "
                   f"engine with {cat.models[j].name!r} (models.{j}): {why}")
    return out


def _too_big_for_every_device(cat: Catalog) -> list[str]:
    """A model needs its weights and its KV reservation on one device. The
    devices a catalog can describe: its CPU devices, its accelerator
    profiles, and any other accelerator type at the default memory."""
    budgets = [d.memory_bytes for d in cat.cpu_devices]
    budgets += [p.memory_bytes for p in cat.discovery.accelerators.values()]
    budgets.append(cat.discovery.default_accelerator_memory_bytes)
    biggest = max(budgets)
    out = []
    for i, m in enumerate(cat.models):
        need = m.weights_bytes + m.kv_cache_bytes
        if need > biggest:
            out.append(f"models.{i}: weights_bytes + kv_cache_bytes = {need} bytes exceed every "
                       f"device (the largest has {biggest}: cpu_devices, "
                       f"discovery.accelerators, discovery.default_accelerator_memory_bytes)")
    return out
