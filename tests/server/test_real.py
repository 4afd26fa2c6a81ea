"""End to end on the real Gemma 3 270M (fp32): `gemma-export serve` through the CLI and
the openai client: completions and a chat reply equal to what the runtime's own
`generate` writes, and four concurrent greedy requests each equal to its run alone."""

from __future__ import annotations

import concurrent.futures as cf

import openai
import pytest

from tests.server.helpers import CliServer


def check_real_server(out) -> None:
    from gemma_export.runtime.generate import SamplingConfig, load_generator

    s = CliServer(out, "--threads", "2", "--served-model-name", "gemma-3-270m")
    try:
        c = openai.OpenAI(base_url=f"{s.url}/v1", api_key="unused", max_retries=0, timeout=120)

        def one(p):
            return c.completions.create(model="gemma-3-270m", prompt=p, max_tokens=12, temperature=0,
                                        extra_body={"ignore_eos": True}).choices[0].text

        gen = load_generator(out, provider="cpu", threads=2)
        prompts = ["The quick brown fox", "Once upon a time", "def fibonacci(n):", "The capital of Japan is"]
        alone = [one(p) for p in prompts]
        assert alone == gen.generate_result(prompts, SamplingConfig(max_new_tokens=12, ignore_eos=True)).texts
        with cf.ThreadPoolExecutor(4) as ex:
            assert list(ex.map(one, prompts)) == alone

        question = "What is the capital of France?"
        r = c.chat.completions.create(model="gemma-3-270m", temperature=0, max_tokens=16,
                                      messages=[{"role": "user", "content": question}])
        own = gen.generate_result([question], SamplingConfig(max_new_tokens=16), chat=True)
        assert r.choices[0].message.content == own.texts[0]
        assert r.choices[0].finish_reason == {"eos": "stop"}.get(own.finish_reasons[0], own.finish_reasons[0])
    finally:
        s.close()
    assert s.proc.returncode == 0


@pytest.mark.real
def test_real_270m_serves_and_batches_exactly(real_artifact):
    check_real_server(real_artifact[0])
