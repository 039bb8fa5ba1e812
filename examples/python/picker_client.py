#!/usr/bin/env python3
"""A client that places its own requests with kvgate's picker API (kvgate.v1.Picker).

For each request it asks kvgate where to send it (Pick), sends it to that endpoint itself
(falling back to the next endpoint of the decision if one cannot be reached), tells kvgate
when the first token arrives and when the response ends (Report), and prints one JSON line.
kvgate counts the request in flight on its endpoint until the final report, and learns from it
(prefix index, TTFT model, token counts) as it does from the requests its proxy sends.

Needs grpcio and grpcio-tools (PyPI). The Python stubs are generated from kvgate's protos
(proto/ beside this repository's examples/, or --proto-dir) into a cache folder on first use.

    pip install grpcio==1.85.1 grpcio-tools==1.85.1
    python examples/python/picker_client.py --picker 127.0.0.1:9002 --model MODEL --prompt "Hello"

`--path /v1/completions` sends each prompt as a completions request (`prompt`); the default,
/v1/chat/completions, sends it as the user message after the system message.
A picker that cannot be reached, or that fails a call, is reported on one line (exit status 1).
`--token-file FILE` sends the token in FILE (kvgate's `picker_api.token_file`) with every call
as `authorization: Bearer <token>`.

A P/D decision names a prefill endpoint; this client sends the request to the decode endpoint
with the decision's headers, which is what a `kvgate sidecar` in front of it expects.
"""

import argparse
import hashlib
import http.client
import importlib
import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def load_stubs(proto_dir):
    """Generates (once) and imports the picker's message and service modules."""
    proto = os.path.join(proto_dir, "kvgate", "v1", "picker.proto")
    with open(proto, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    # One folder per version of the protos, made whole before it is moved into place.
    out = os.path.join(tempfile.gettempdir(), f"kvgate-picker-stubs-{digest}")
    if not os.path.isdir(out):
        from grpc_tools import protoc

        work = tempfile.mkdtemp(prefix="kvgate-picker-stubs-")
        code = protoc.main(["protoc", f"-I{proto_dir}", f"--python_out={work}", f"--grpc_python_out={work}", proto])
        if code != 0:
            sys.exit(f"could not generate the stubs from {proto}")
        try:
            os.rename(work, out)
        except OSError:
            pass  # another run made it first
    sys.path.insert(0, out)
    return importlib.import_module("kvgate.v1.picker_pb2"), importlib.import_module("kvgate.v1.picker_pb2_grpc")


def send(endpoint, path, headers, body):
    """POSTs `body` to `endpoint`; returns the open response (raises OSError if unreachable)."""
    host, port = endpoint.rsplit(":", 1)
    conn = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=60)
    conn.request("POST", path, body=body, headers=headers)
    return conn.getresponse()


def request_body(args, question):
    """The OpenAI body for --path: a prompt for /v1/completions, messages for chat."""
    body = {"model": args.model, "max_tokens": args.max_tokens, "stream": True,
            "stream_options": {"include_usage": True}}
    if args.path == COMPLETIONS:
        body["prompt"] = question
    else:
        body["messages"] = [{"role": "system", "content": args.system}, {"role": "user", "content": question}]
    return json.dumps(body).encode()


def run_one(pb, stub, args, question):
    body = request_body(args, question)
    answer = stub.Pick(pb.PickRequest(path=args.path, body=body, max_endpoints=2), timeout=10)
    if answer.WhichOneof("result") == "refusal":
        r = answer.refusal
        return {"refused": r.status, "code": r.code, "message": r.message}
    d = answer.decision
    to_send = d.body if d.HasField("body") else body
    # The decision's placement headers; a proxying caller would also drop d.remove_headers from
    # its client's headers.
    headers = {k: v for k, v in d.headers.items() if k != "x-gateway-destination-endpoint"}
    headers["content-type"] = "application/json"
    resp, served = None, None
    for e in d.endpoints:
        try:
            resp, served = send(e.address, args.path, headers, to_send), e.address
            break
        except OSError:
            continue
    if resp is None:
        stub.Report(pb.ReportRequest(decision_id=d.decision_id,
                                     failed=pb.Failed(kind=pb.FAILURE_KIND_UNREACHABLE, message="no endpoint")))
        return {"decision_id": d.decision_id, "error": "no endpoint could be reached"}
    first = pb.FirstToken(status=resp.status, streaming=resp.getheader("content-type", "").startswith("text/event-stream"))
    report = pb.ReportRequest(decision_id=d.decision_id, first_token=first)
    if served != d.endpoints[0].address:
        report.served_by = served
    text, usage, size, started = [], None, 0, False
    while True:
        line = resp.readline()
        if not line:
            break
        size += len(line)
        if not started:
            # The first bytes of the answer: its first token.
            stub.Report(report)
            started = True
        line = line.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[len("data: "):])
        for c in chunk.get("choices", []):
            text.append((c.get("delta") or {}).get("content") or c.get("text") or "")
        if chunk.get("usage"):
            usage = chunk["usage"]
    end = pb.Finished(status=resp.status, response_bytes=size)
    if usage:
        end.usage.prompt_tokens = usage.get("prompt_tokens", 0)
        end.usage.completion_tokens = usage.get("completion_tokens", 0)
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
        if cached is not None:
            end.usage.cached_tokens = cached
    final = pb.ReportRequest(decision_id=d.decision_id, finished=end)
    if not started:
        final.first_token.CopyFrom(first)
    ended = stub.Report(final).ended
    return {"decision_id": d.decision_id, "endpoint": served, "status": resp.status, "text": "".join(text),
            "usage": usage, "ended": ended}


class WithToken:
    """The stub's calls, each with `authorization: Bearer <token>` metadata."""

    def __init__(self, stub, token):
        self._stub, self._metadata = stub, (("authorization", f"Bearer {token}"),)

    def __getattr__(self, name):
        call = getattr(self._stub, name)
        return lambda *args, **kwargs: call(*args, metadata=self._metadata, **kwargs)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--picker", default="127.0.0.1:9002", help="kvgate's gRPC address")
    p.add_argument("--model", required=True)
    p.add_argument("--system", default="You are a helpful assistant.", help="the system message (chat only)")
    p.add_argument("--prompt", action="append",
                   help="a user message (chat) or a prompt (completions); repeatable (one request each)")
    p.add_argument("--path", default=CHAT, choices=[CHAT, COMPLETIONS],
                   help="the API to call: chat sends messages, completions a prompt")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--proto-dir", default=os.path.join(HERE, "..", "..", "proto"))
    p.add_argument("--token-file", help="a file holding the picker API's bearer token")
    args = p.parse_args()
    token = None
    if args.token_file:
        try:
            with open(args.token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as e:
            sys.exit(f"error: cannot read --token-file {args.token_file}: {e.strerror}")
    try:
        import grpc
    except ImportError:
        sys.exit("error: this client needs grpcio and grpcio-tools (pip install grpcio grpcio-tools)")

    pb, rpc = load_stubs(os.path.abspath(args.proto_dir))
    with grpc.insecure_channel(args.picker) as channel:
        stub = rpc.PickerStub(channel)
        if token:
            stub = WithToken(stub, token)
        try:
            for question in args.prompt or ["Hello!"]:
                print(json.dumps(run_one(pb, stub, args, question)), flush=True)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                sys.exit(f"error: cannot reach kvgate's picker at {args.picker} ({e.details()})")
            sys.exit(f"error: kvgate's picker at {args.picker} answered {e.code().name}: {e.details()}")


if __name__ == "__main__":
    main()
