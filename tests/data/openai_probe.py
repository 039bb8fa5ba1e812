"""Drives kvgate's proxy with the official `openai` SDK, as a client of a vLLM server would.

usage: openai_probe.py ROOT MODEL LIMITED_MODEL
  ROOT           the proxy's root URL (http://host:port, no /v1)
  MODEL          a model of a pool with simulators behind it
  LIMITED_MODEL  a model of a pool admitting one request at a time (for the 429)

Exits non-zero with a message on the first thing that is not as a vLLM server answers it.
"""

import sys

import openai
import openai._base_client
from openai import OpenAI

# The HTTP library's response type, to read a body-less answer raw (the SDK's own HTTP library
# is httpx2 in newer releases, httpx in older ones).
RawResponse = (getattr(openai._base_client, "httpx2", None) or __import__("httpx")).Response

root, model, limited = sys.argv[1], sys.argv[2], sys.argv[3]
api = OpenAI(base_url=f"{root}/v1", api_key="unused", max_retries=0, timeout=30)
# The server root, for the paths outside /v1 that every vLLM server has.
server = OpenAI(base_url=root, api_key="unused", max_retries=0, timeout=30)
checks = []


def check(name, ok, detail=""):
    checks.append(name)
    if not ok:
        sys.exit(f"FAILED {name}: {detail}")


def raises(name, error, call):
    try:
        call()
    except error as e:
        checks.append(name)
        return e
    except Exception as e:  # noqa: BLE001 - any other outcome is the failure being reported
        sys.exit(f"FAILED {name}: expected {error.__name__}, got {type(e).__name__}: {e}")
    sys.exit(f"FAILED {name}: expected {error.__name__}, the call succeeded")


# Models: the list and one model, with OpenAI's fields and vLLM's max_model_len.
listed = api.models.list().data
ids = [m.id for m in listed]
check("models.list names the model", model in ids, ids)
for m in listed:
    check(f"models.list entry {m.id} has OpenAI's fields",
          m.object == "model" and isinstance(m.created, int) and m.created > 0 and m.owned_by, m)
one = api.models.retrieve(model)
check("models.retrieve", one.id == model and one.object == "model" and isinstance(one.created, int), one)
check("models.retrieve max_model_len", (one.model_extra or {}).get("max_model_len", 0) > 0, one)
e = raises("models.retrieve of an unknown model", openai.NotFoundError, lambda: api.models.retrieve("no-such-model"))
check("its error code", e.code == "model_not_found", e.body)

# Generation.
chat = api.chat.completions.create(model=model, messages=[{"role": "user", "content": "hello"}], max_tokens=5)
check("chat", chat.choices[0].message.content and chat.usage.completion_tokens == 5, chat)
text = api.completions.create(model=model, prompt="once upon a time", max_tokens=4)
check("completions", text.choices[0].text and text.usage.completion_tokens == 4, text)
chunks = list(api.chat.completions.create(model=model, messages=[{"role": "user", "content": "count"}],
                                          max_tokens=6, stream=True, stream_options={"include_usage": True}))
pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
check("chat stream", len(pieces) == 6 and chunks[-1].usage.completion_tokens == 6, chunks[-1])
two = api.chat.completions.create(model=model, messages=[{"role": "user", "content": "two"}], max_tokens=3, n=2)
check("n=2", sorted(c.index for c in two.choices) == [0, 1] and two.usage.completion_tokens == 6, two)
lp = api.chat.completions.create(model=model, messages=[{"role": "user", "content": "lp"}], max_tokens=3,
                                 logprobs=True, top_logprobs=2)
content = lp.choices[0].logprobs.content
check("chat logprobs", len(content) == 3 and all(len(t.top_logprobs) == 2 for t in content), lp)
emb = api.embeddings.create(model=model, input=["first text", "second text"])
check("embeddings", len(emb.data) == 2 and len(emb.data[0].embedding) > 0 and emb.usage.prompt_tokens > 0, emb)
resp = api.responses.create(model=model, input="say something", max_output_tokens=4)
# At max_output_tokens vLLM marks the response incomplete, naming why.
check("responses", resp.id.startswith("resp_") and resp.status == "incomplete" and resp.output_text
      and resp.incomplete_details.reason == "max_output_tokens" and resp.usage.output_tokens == 4, resp)
streamed = list(api.responses.create(model=model, input="say more", max_output_tokens=3, stream=True))
kinds = [e.type for e in streamed]
check("responses stream", kinds[0] == "response.created" and kinds[-1] == "response.completed"
      and kinds.count("response.output_text.delta") >= 1
      and [e.sequence_number for e in streamed] == list(range(len(streamed))), kinds)
stopped = api.completions.create(model=model, prompt="tell me", max_tokens=200, stop=["e"])
choice = stopped.choices[0]
check("stop", choice.finish_reason == "stop" and "e" not in choice.text
      and (choice.model_extra or {}).get("stop_reason") == "e" and stopped.usage.completion_tokens < 200, stopped)

# Errors, as the SDK maps them.
e = raises("chat for an unknown model", openai.NotFoundError,
           lambda: api.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}]))
check("its error code", e.code == "model_not_found", e.body)
raises("a body that is not a chat request", openai.BadRequestError,
       lambda: api.post("/chat/completions", body={"model": model}, cast_to=object))
with api.chat.completions.create(model=limited, messages=[{"role": "user", "content": "go on"}],
                                 max_tokens=2000, stream=True) as held:
    next(iter(held))
    e = raises("a second request over the pool's limit", openai.RateLimitError,
               lambda: api.chat.completions.create(model=limited, messages=[{"role": "user", "content": "x"}],
                                                   max_tokens=1))
    check("its Retry-After", e.response.headers.get("retry-after") is not None, dict(e.response.headers))

# The server's own paths.
health = server.get("/health", cast_to=RawResponse)
check("health", health.status_code == 200 and health.content == b"", health)
version = server.get("/version", cast_to=object)
check("version", isinstance(version, dict) and version.get("version"), version)
tok = server.post("/tokenize", body={"model": model, "prompt": "hello world"}, cast_to=object)
check("tokenize", tok["count"] == len(tok["tokens"]) > 0 and tok["max_model_len"] > 0, tok)
detok = server.post("/detokenize", body={"model": model, "tokens": tok["tokens"]}, cast_to=object)
# The simulator's vocabulary hashes text into ids, so its text of ids is a stand-in.
check("detokenize", isinstance(detok["prompt"], str) and detok["prompt"], detok)

print(f"ok: {len(checks)} checks")
