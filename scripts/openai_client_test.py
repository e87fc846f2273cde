"""The official OpenAI Python client against `apb serve` (run by openai-client-test.sh)."""
import sys

import openai

base = sys.argv[1]
client = openai.OpenAI(base_url=f"{base}/v1", api_key="sekret", max_retries=0)

models = [m.id for m in client.models.list().data]
assert models and "SmolLM2" in models[0], models
model = models[0]

question = [{"role": "user", "content": "What is the capital of France?"}]
r = client.chat.completions.create(model=model, messages=question, max_tokens=12)
answer = r.choices[0].message.content
assert "Paris" in answer, r
assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens, r.usage

chunks = list(client.chat.completions.create(
    model=model, messages=question, max_tokens=12, stream=True,
    stream_options={"include_usage": True}))
streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
assert streamed == answer, (streamed, answer)
assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == r.usage.completion_tokens

c = client.completions.create(model=model, prompt="The capital of France is", max_tokens=6)
assert "Paris" in c.choices[0].text and c.choices[0].finish_reason == "length", c
parts = list(client.completions.create(
    model=model, prompt="The capital of France is", max_tokens=6, stream=True))
assert "".join(p.choices[0].text for p in parts if p.choices) == c.choices[0].text

try:
    client.chat.completions.create(model=model, messages=question, n=2)
    raise SystemExit("n=2 was accepted")
except openai.BadRequestError as e:
    assert "'n'" in str(e), e
try:
    client.chat.completions.create(model="gpt-4", messages=question)
    raise SystemExit("an unknown model was accepted")
except openai.NotFoundError:
    pass
bad = openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0)
try:
    bad.models.list()
    raise SystemExit("a wrong key was accepted")
except openai.AuthenticationError:
    pass
print(f"openai {openai.__version__} client against apb serve: chat, stream, completions, models, errors ok")
