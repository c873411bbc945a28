"""One vLLM OpenAI serving layer per catalog model, at the front door.

Built on a model's first request from its checkpoint's config and
tokenizer (no engine: vLLM's GPU-less render-server recipe), over a
``ShoalEngineClient`` whose tokens come from the engine workers through the
router. Same family means same tokenizer, but each model keeps its own
layer: it answers under its own name and its own context length.
"""

from __future__ import annotations

import asyncio
from typing import Any

from cluster.catalog import ModelSpec
from cluster.gateway.engine_client import ShoalEngineClient
from cluster.gateway.openai_serving import OpenAIServing


def engine_config(spec: ModelSpec):
    """vLLM's config, renderer and input processor for ``spec``, as its
    engines will see them, without starting an engine."""
    from vllm import AsyncEngineArgs, envs
    from vllm.config import VllmConfig
    from vllm.renderers.registry import renderer_from_config
    from vllm.v1.engine.input_processor import InputProcessor

    args = AsyncEngineArgs(model=spec.path, served_model_name=[spec.name],
                           max_model_len=spec.max_model_len, **spec.engine_args)
    model_config = args.create_model_config()
    model_config.quantization = None  # no kernels here: skip their checks
    envs.VLLM_CPU_KVCACHE_SPACE = 0  # no KV cache here either
    config = VllmConfig(model_config=model_config,
                        logging_config=args.create_logging_config(),
                        structured_outputs_config=args.create_structured_outputs_config())
    renderer = renderer_from_config(config)
    return config, renderer, InputProcessor(config, renderer)


class OpenAIFrontends:
    def __init__(self, specs: dict[str, ModelSpec], router: Any):
        self.specs = specs
        self.router = router
        self._layers: dict[str, OpenAIServing] = {}
        self._building: dict[str, asyncio.Task] = {}

    async def get(self, model: str) -> OpenAIServing:
        layer = self._layers.get(model)
        if layer is not None:
            return layer
        task = self._building.get(model)
        if task is None:  # one build per model, however many requests wait for it
            task = self._building[model] = asyncio.ensure_future(self._build(model))
        try:
            return await asyncio.shield(task)
        finally:
            if task.done():
                self._building.pop(model, None)

    async def _build(self, model: str) -> OpenAIServing:
        spec = self.specs[model]
        config, renderer, processor = await asyncio.to_thread(engine_config, spec)
        client = ShoalEngineClient(model, config, renderer, processor, self.router)
        layer = self._layers[model] = await OpenAIServing.create(client, spec.path, model)
        return layer
