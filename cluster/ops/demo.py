"""``shoal demo`` (the second half of ``make run``): a few requests through
the official ``openai`` client against a running ``shoal up --demo``.

Three tiny models of one family and one of another share two CPU devices:
the first request to each cold model waits while it loads (same-family ones
join an existing engine by an in-place swap), then the status table shows
where everything went.
"""

from __future__ import annotations

import time

PROMPT = "The tide comes in twice a day and the boats"


def run_demo(base_url: str) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{base_url}/v1", api_key="unused")
    print("models:", ", ".join(f"{m.id} ({m.model_extra.get('state')})"
                               for m in client.models.list().data))
    for model in ("tiny-llama-a", "tiny-llama-b", "tiny-qwen", "tiny-llama-c"):
        t0 = time.perf_counter()
        out = client.completions.create(model=model, prompt=PROMPT, max_tokens=12,
                                        temperature=0)
        print(f"{model:14s} {time.perf_counter() - t0:6.2f} s  {out.choices[0].text!r}")
    print("streaming chat from tiny-llama-a: ", end="", flush=True)
    stream = client.chat.completions.create(
        model="tiny-llama-a", messages=[{"role": "user", "content": PROMPT}],
        max_tokens=16, temperature=0, stream=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()
    from cluster.ops.lifecycle import status
    from cluster.ops.status_table import status_table

    print(status_table(status()))
