"""Drives a running lifelora server with the official `openai` client.

Usage: python3 tests/openai_client.py BASE_URL MODEL [--english | --fine-tune]
Exits non-zero (with the assertion) on any mismatch.
"""
import io
import json
import sys
import time
import warnings

import openai
from openai import OpenAI

def exactly(cls, raw_call, *args, **kwargs):
    """The object a call returns, checked against the official client's type:
    validated from the raw JSON (a wrong type or literal fails), and dumped
    with serializer warnings as errors (what the client prints otherwise)."""
    response = raw_call(*args, **kwargs)
    body = response.http_response.json()
    items = body["data"] if body.get("object") == "list" else [body]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for item in items:
            typed = cls.model_validate(item)
            typed.model_dump(warnings="error")
            cls.construct(**item).model_dump(warnings="error")
    return response.parse()


base, model = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=f"{base}/v1", api_key="unused")

ids = [m.id for m in client.models.list()]
assert model in ids, ids
card = client.models.retrieve(model)
assert card.id == model and card.object == "model", card
try:
    client.models.retrieve("no-such-model")
    raise AssertionError("an unknown model was retrieved")
except openai.NotFoundError:
    pass

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

# logit_bias as OpenAI defines it: -100 bans a token, so greedy decoding picks another.
hello = [{"role": "user", "content": "Hello"}]
first = client.chat.completions.create(model=model, messages=hello, max_tokens=1, temperature=0,
                                       extra_body={"return_token_ids": True}).choices[0]
greedy = first.model_extra["token_ids"][0]
banned = client.chat.completions.create(model=model, messages=hello, max_tokens=1, temperature=0,
                                        logit_bias={str(greedy): -100}, extra_body={"return_token_ids": True}).choices[0]
assert banned.model_extra["token_ids"][0] != greedy, (greedy, banned)
forced = client.completions.create(model=model, prompt="Once upon a time", max_tokens=3, temperature=0,
                                   logit_bias={str(greedy): 100}, extra_body={"return_token_ids": True}).choices[0]
assert forced.model_extra["token_ids"] == [greedy] * 3, (greedy, forced)
# vLLM's min_p and repetition_penalty are honoured (extra_body, as vLLM's clients send them).
client.completions.create(model=model, prompt="Once upon a time", max_tokens=4, temperature=0.8, seed=1,
                          extra_body={"min_p": 0.1, "repetition_penalty": 1.3})
try:
    client.chat.completions.create(model=model, messages=hello, max_tokens=1, extra_body={"frobnicate": 1})
    raise AssertionError("an unknown parameter was accepted")
except openai.BadRequestError as e:
    assert e.status_code == 400 and e.param == "frobnicate", e
client.chat.completions.create(model=model, messages=hello, max_tokens=1, user="end-user-1", metadata={"k": "v"})

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

if len(sys.argv) > 3 and sys.argv[3] == "--fine-tune":
    # The OpenAI way to fine-tune: upload JSONL, start a job, follow it, use the result.
    prompts = ["Once upon a time", "The little dog", "One day", "She was happy"]
    answers = [client.completions.create(model=model, prompt=p, max_tokens=5, temperature=0).choices[0].text for p in prompts]
    # Teach each prompt the next prompt's answer (text the model's own vocabulary spells).
    lines = [json.dumps({"prompt": p, "completion": answers[(i + 1) % len(prompts)]}) for i, p in enumerate(prompts)]
    from openai.types import FileObject, FileDeleted
    from openai.types.fine_tuning import FineTuningJob, FineTuningJobEvent
    from openai.types.fine_tuning.jobs import FineTuningJobCheckpoint
    raw = client.with_raw_response
    f = exactly(FileObject, raw.files.create, file=("facts.jsonl", io.BytesIO("\n".join(lines).encode())), purpose="fine-tune")
    exactly(FileObject, raw.files.retrieve, f.id)
    exactly(FileObject, raw.files.list, purpose="fine-tune")
    assert f.object == "file" and f.purpose == "fine-tune" and f.bytes > 0, f
    assert client.files.retrieve(f.id).filename == "facts.jsonl"
    assert f.id in [x.id for x in client.files.list(purpose="fine-tune")]
    assert client.files.content(f.id).read().decode().splitlines() == lines

    job = exactly(FineTuningJob, raw.fine_tuning.jobs.create,
        model=model, training_file=f.id, suffix="facts", seed=7, metadata={"team": "search", "ticket": "T-1"},
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 20, "learning_rate_multiplier": 10}}},
    )
    assert job.status == "queued" and job.training_file == f.id, job
    assert job.seed == 7 and job.metadata == {"team": "search", "ticket": "T-1"}, job
    assert job.method.type == "supervised" and job.method.supervised.hyperparameters.n_epochs == 20, job.method
    assert job.hyperparameters.learning_rate_multiplier == 10, job.hyperparameters
    started = time.time()
    while job.status not in ("succeeded", "failed", "cancelled"):
        assert time.time() - started < 120, job
        time.sleep(0.2)
        job = client.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "succeeded", job
    job = exactly(FineTuningJob, raw.fine_tuning.jobs.retrieve, job.id)
    assert job.seed == 7 and job.metadata == {"team": "search", "ticket": "T-1"}, job
    assert job.fine_tuned_model == "facts@v1", job
    exactly(FineTuningJob, raw.fine_tuning.jobs.list, limit=5)
    exactly(FineTuningJobEvent, raw.fine_tuning.jobs.list_events, job.id, limit=100)
    exactly(FineTuningJobCheckpoint, raw.fine_tuning.jobs.checkpoints.list, job.id)
    assert job.id in [j.id for j in client.fine_tuning.jobs.list(limit=5)]
    events = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100)]
    assert "The job has successfully completed" in events, events
    ckpt = client.fine_tuning.jobs.checkpoints.list(job.id).data[0]
    assert ckpt.fine_tuned_model_checkpoint == "facts@v1" and ckpt.metrics.valid_loss is not None, ckpt
    learned = client.completions.create(model=job.fine_tuned_model, prompt=prompts[0], max_tokens=5, temperature=0).choices[0].text
    assert learned != answers[0], "the learned version answers as the base did"

    try:
        client.fine_tuning.jobs.create(model=model, training_file="file-missing")
        raise AssertionError("a missing training file was accepted")
    except openai.BadRequestError as e:
        assert e.status_code == 400
    try:
        client.files.create(file=("x.jsonl", io.BytesIO(b"not json")), purpose="fine-tune")
        raise AssertionError("a file that is not JSONL was accepted")
    except openai.BadRequestError as e:
        assert e.status_code == 400
    try:
        client.fine_tuning.jobs.create(model=model, training_file=f.id, metadata={"n": 1})
        raise AssertionError("metadata with a number was accepted")
    except openai.BadRequestError as e:
        assert e.param == "metadata.n", e

    # A run on feedback: a down-rating with a correction trains a preference, and says so.
    answer = client.completions.create(model=model, prompt="Tom and Lily", max_tokens=4, temperature=0)
    client.post("/feedback", body={"completion_id": answer.id, "rating": -1, "correction": answers[1]}, cast_to=object)
    fb_job = client.post("/adapters/main/train", body={"hyperparameters": {"n_steps": 4, "seed": 3}, "metadata": {"from": "feedback"}},
                         cast_to=FineTuningJob)
    assert fb_job.method.type == "dpo" and fb_job.seed == 3 and fb_job.metadata == {"from": "feedback"}, fb_job
    started = time.time()
    while fb_job.status not in ("succeeded", "failed", "cancelled"):
        assert time.time() - started < 120, fb_job
        time.sleep(0.2)
        fb_job = exactly(FineTuningJob, raw.fine_tuning.jobs.retrieve, fb_job.id)
    assert fb_job.method.type == "dpo" and fb_job.method.dpo.hyperparameters.beta > 0, fb_job.method
    assert fb_job.training_file == "" and len(fb_job.model_extra["feedback_ids"]) == 1, fb_job

    assert exactly(FileDeleted, raw.files.delete, f.id).deleted
    try:
        client.files.retrieve(f.id)
        raise AssertionError("a deleted file is still there")
    except openai.NotFoundError:
        pass
    print("fine-tuning: ok", job.fine_tuned_model, job.trained_tokens)

print("openai client: ok")
