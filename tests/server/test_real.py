"""End to end on the real Gemma 3 270M (fp32): `gemma-export serve` through the CLI, the
openai client, a chat answer that knows something, and four concurrent greedy requests
each equal to its run alone."""

from __future__ import annotations

import concurrent.futures as cf

import openai
import pytest

from tests.server.helpers import CliServer


@pytest.mark.real
def test_real_270m_serves_chat_and_batches_exactly(real_artifact):
    out, _ = real_artifact
    s = CliServer(out, "--threads", "2", "--served-model-name", "gemma-3-270m")
    try:
        c = openai.OpenAI(base_url=f"{s.url}/v1", api_key="unused", max_retries=0, timeout=120)
        r = c.chat.completions.create(model="gemma-3-270m", temperature=0, max_tokens=16,
                                      messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert "Paris" in r.choices[0].message.content
        prompts = ["The quick brown fox", "Once upon a time", "def fibonacci(n):", "The capital of Japan is"]

        def one(p):
            return c.completions.create(model="gemma-3-270m", prompt=p, max_tokens=12, temperature=0,
                                        extra_body={"ignore_eos": True}).choices[0].text

        alone = [one(p) for p in prompts]
        with cf.ThreadPoolExecutor(4) as ex:
            assert list(ex.map(one, prompts)) == alone
    finally:
        s.close()
    assert s.proc.returncode == 0
