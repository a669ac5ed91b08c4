"""Drives a running lifelora server with the official `openai` client.

Usage: python3 tests/openai_client.py BASE_URL MODEL
Exits non-zero (with the assertion) on any mismatch.
"""
import sys

import openai
from openai import OpenAI

base, model = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=f"{base}/v1", api_key="unused")

ids = [m.id for m in client.models.list()]
assert model in ids, ids

c = client.completions.create(model=model, prompt="Once upon a time", max_tokens=8, temperature=0)
assert c.choices[0].finish_reason == "length", c
assert c.usage.completion_tokens == 8, c.usage
plain_text = c.choices[0].text

streamed = "".join(
    chunk.choices[0].text
    for chunk in client.completions.create(model=model, prompt="Once upon a time", max_tokens=8, temperature=0, stream=True)
    if chunk.choices
)
assert streamed == plain_text, (streamed, plain_text)

chat = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "Hello"}], max_tokens=8, temperature=0
)
assert chat.choices[0].message.role == "assistant"
chat_text = chat.choices[0].message.content

parts, usage = [], None
for chunk in client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "Hello"}], max_tokens=8, temperature=0,
    stream=True, stream_options={"include_usage": True},
):
    if chunk.choices and chunk.choices[0].delta.content:
        parts.append(chunk.choices[0].delta.content)
    if chunk.usage:
        usage = chunk.usage
assert "".join(parts) == chat_text, (parts, chat_text)
assert usage is not None and 1 <= usage.completion_tokens <= 8, usage
assert usage.completion_tokens == chat.usage.completion_tokens, (usage, chat.usage)

if len(sys.argv) > 3 and sys.argv[3] == "--english":
    # A real model answers in words.
    import re
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Write one sentence about the sea."}],
        max_tokens=40, temperature=0,
    ).choices[0].message.content
    words = re.findall(r"[A-Za-z]{2,}", reply)
    assert len(words) >= 5, reply
    streamed_reply = "".join(
        chunk.choices[0].delta.content or ""
        for chunk in client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Write one sentence about the sea."}],
            max_tokens=40, temperature=0, stream=True,
        )
        if chunk.choices
    )
    assert streamed_reply == reply, (streamed_reply, reply)
    print("reply:", reply)

try:
    client.completions.create(model="no-such-model", prompt="x")
    raise AssertionError("unknown model accepted")
except openai.NotFoundError as e:
    assert e.status_code == 404

try:
    client.completions.create(model=model, prompt="x", temperature=7)
    raise AssertionError("bad temperature accepted")
except openai.BadRequestError as e:
    assert e.status_code == 400

print("openai client: ok")
