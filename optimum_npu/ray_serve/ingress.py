"""The one OpenAI endpoint in front of the engine replicas.

Every request (any path: /v1/completions, /v1/chat/completions, /v1/models, ...) goes as it
came (method, path, headers, body) to one engine replica, chosen by the deployment's request
router, and the replica's response comes back as it is produced (a stream stays a stream). The
ingress reads the prompt from the JSON body only to give the router a `routing_key`.

A replica that dies with a request in flight ends that request with an error, never a hang: a
503 with an OpenAI-style error body if the response had not started, else a final server-sent
`error` event on a stream (the `openai` client raises it) or a cut body.
"""

from __future__ import annotations

import json

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

# The first part of a response (its status and headers) must come within this time; it is the
# replica's start of work on the request, the first token for a stream (queueing included).
FIRST_RESPONSE_TIMEOUT_S = 600.0
# Headers that describe this hop's connection, not the request.
HOP_HEADERS = {b"host", b"connection", b"content-length", b"transfer-encoding", b"keep-alive"}
MAX_KEY_CHARS = 16_384  # prefix routing looks at the prompt's start only

app = FastAPI()


def routing_key(body: bytes) -> str | None:
    """The prompt of an OpenAI request body as text (completions: the prompt, token ids as their
    JSON; chat: the messages' roles and contents), cut at MAX_KEY_CHARS; None when there is none."""
    try:
        payload = json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(payload, dict):
        return None
    if "prompt" in payload:
        prompt = payload["prompt"]
        text = prompt if isinstance(prompt, str) else json.dumps(prompt)
    elif isinstance(payload.get("messages"), list):
        parts = []
        for m in payload["messages"]:
            if isinstance(m, dict):
                content = m.get("content")
                parts.append(f"{m.get('role')}:{content if isinstance(content, str) else json.dumps(content)};")
        text = "".join(parts)
    else:
        return None
    return text[:MAX_KEY_CHARS] or None


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "ServiceUnavailable", "code": status}},
                        status_code=status)


@serve.deployment(name="OpenAIIngress", num_replicas=1, max_ongoing_requests=1024,
                  ray_actor_options={"num_cpus": 0})
@serve.ingress(app)
class OpenAIIngress:
    def __init__(self, engine):
        self.engine = engine.options(stream=True)

    @app.api_route("/{path:path}", methods=["GET", "POST", "DELETE"])
    async def forward(self, path: str, request: Request):
        import asyncio

        body = await request.body()
        headers = [(k, v) for k, v in request.headers.raw if k.lower() not in HOP_HEADERS]
        stream = self.engine.remote(request.method, "/" + path, headers, body, request.url.query.encode(),
                                    routing_key=routing_key(body))
        try:
            start = await asyncio.wait_for(stream.__anext__(), timeout=FIRST_RESPONSE_TIMEOUT_S)
        except asyncio.TimeoutError:
            stream.cancel()
            return _error(504, f"no response from the engine replica within {FIRST_RESPONSE_TIMEOUT_S:.0f} s")
        except StopAsyncIteration:
            return _error(502, "the engine replica ended the request without a response")
        except Exception as err:  # the replica died or was lost: Ray restarts it; this request is over
            return _error(503, f"the engine replica serving this request failed ({type(err).__name__}: "
                               f"{str(err).splitlines()[0] if str(err) else ''}); retry the request")
        _, status, raw_headers = start
        is_event_stream = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream")
                              for k, v in raw_headers)

        async def rest():
            try:
                async for chunk in stream:
                    yield chunk
            except Exception as err:
                if is_event_stream:  # the openai client raises an APIError on an `error` event
                    message = json.dumps({"error": {"message": f"the engine replica serving this stream failed "
                                                               f"({type(err).__name__}); retry the request",
                                                    "type": "ServiceUnavailable", "code": 503}})
                    yield f"data: {message}\n\n".encode()
                # else: the body ends short, which the client sees as a broken response

        response = StreamingResponse(rest(), status_code=status)
        response.raw_headers = [(k, v) for k, v in raw_headers if k.lower() not in HOP_HEADERS]
        return response
