"""An OpenAI-compatible front end (``POST /v1/chat/completions``, ``GET /v1/models``) in front of the
Triton server that ``ppllava serve`` runs: FastAPI on uvicorn, talking to Triton over gRPC
(``ppllava`` for one answer, the decoupled ``ppllava_stream`` for ``stream: true``).

Messages follow vLLM / trtllm-serve: ``system``, ``user`` and ``assistant`` turns; a user turn's
content is a string or a list of ``text`` / ``video_url`` / ``image_url`` parts. Exactly one video
or image per conversation, in the first user turn. ``file://`` URLs must lie under the server's
``--allow`` directories; ``data:`` URLs (base64) are sent to Triton as ``video_bytes``, which the
model writes to a private temp file for the request's duration; http(s) URLs are refused (the server
never fetches anything). The request is checked here with ``request.parse_request`` (the same rules
as Triton's model), so a refusal is a 400 with one line before any Triton work starts.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoint's `Request` annotation at
# runtime, and it is imported inside create_app (fastapi stays optional for the rest of serving).
import base64
import binascii
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np

from ppllava.errors import InputError, PPLLaVAError
from ppllava.runtime.serving.request import INPUTS, client_message, parse_request

log = logging.getLogger(__name__)
MODEL_ID = "ppllava"
MAX_DATA_BYTES = 64 * 2**20  # a data: URL whose decoded content is larger is refused before decoding
# OpenAI field -> Triton input; `frames`, `start`, `end`, `tokens` are this server's extra fields.
NUMBERS = {"max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens", "temperature": "temperature",
           "top_p": "top_p", "seed": "seed", "frames": "frames", "start": "start", "end": "end", "tokens": "tokens"}
INTS = {"max_new_tokens", "seed", "frames", "tokens"}


@dataclass
class OpenAIOptions:
    triton_grpc: str  # host:port of the Triton server's gRPC endpoint
    host: str = "127.0.0.1"
    port: int = 8080
    allow: list[Path] = field(default_factory=list)
    max_data_bytes: int = MAX_DATA_BYTES


class ApiError(Exception):
    """An OpenAI-style error reply: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, message: str, status: int = 400, kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(" ".join(message.split()))
        self.status, self.kind, self.code = status, kind, code

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": None, "code": self.code}}


# ---------------------------------------------------------------------------------- request -> inputs
def _media(url: str, allow: list[Path], max_bytes: int) -> tuple[str, bytes]:
    """("video", path bytes) or ("video_bytes", content) for one video_url / image_url."""
    scheme = urlparse(url).scheme.lower()
    if scheme == "file":
        return "video", unquote(urlparse(url).path).encode()
    if scheme == "data":
        header, _, payload = url.partition(",")
        if not header.endswith(";base64"):
            raise ApiError("data: URLs must be base64 (data:<type>;base64,<content>)")
        if len(payload) * 3 // 4 > max_bytes:
            raise ApiError(f"data: URL of about {len(payload) * 3 // 4} bytes is more than the {max_bytes} allowed")
        try:
            return "video_bytes", base64.b64decode(payload, validate=True)
        except binascii.Error:
            raise ApiError("data: URL is not valid base64") from None
    if scheme in ("http", "https"):
        raise ApiError("remote URLs are not fetched by this server: send a file:// path under its --allow "
                       "directories or the content as a data: URL")
    raise ApiError(f"unsupported URL scheme {scheme!r}: use file:// or data:")


def _turn(message: dict, index: int) -> tuple[str, list[str]]:
    """(text, media URLs) of one message."""
    content = message.get("content")
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise ApiError(f"messages[{index}].content: expected a string or a list of parts")
    texts, urls = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind in ("video_url", "image_url") and isinstance(part.get(kind), dict) and isinstance(part[kind].get("url"), str):
            urls.append(part[kind]["url"])
        else:
            raise ApiError(f"messages[{index}].content: unsupported part {kind!r} (use text, video_url or image_url)")
    return "\n".join(texts), urls


def chat_inputs(body: dict, allow: list[Path], max_bytes: int = MAX_DATA_BYTES) -> dict[str, np.ndarray]:
    """The Triton inputs (name -> array of shape [1, 1]) for one chat-completions body, checked."""
    if not isinstance(body, dict):
        raise ApiError("the request body must be a JSON object")
    if body.get("model") not in (None, MODEL_ID):
        raise ApiError(f"model {body['model']!r} does not exist; this server has {MODEL_ID!r}", 404,
                       code="model_not_found")
    if body.get("n", 1) != 1:
        raise ApiError("n: only 1 choice per request is supported")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError("messages: expected a non-empty list")
    system, turns, media = [], [], []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ("system", "user", "assistant"):
            raise ApiError(f"messages[{i}].role: expected system, user or assistant, got {role!r}")
        text, urls = _turn(message, i)
        if role == "system":
            system.append(text)
        else:
            turns.append((role, text))
        if urls and (role != "user" or media or sum(r == "user" for r, _ in turns) != 1):
            raise ApiError("send exactly one video or image per conversation, in the first user turn")
        media += urls
    if len(media) != 1:
        raise ApiError("send exactly one video or image per conversation, in the first user turn")
    users = [t for r, t in turns if r == "user"]
    if [r for r, _ in turns] != ["user", "assistant"] * (len(users) - 1) + ["user"]:
        raise ApiError("messages: expected user and assistant turns alternating, starting and ending with user")
    if system:  # the prompt template has no system slot: the instructions lead the first question
        users[0] = "\n".join([*system, users[0]])
    answers = [t for r, t in turns if r == "assistant"]
    name, value = _media(media[0], allow, max_bytes)
    inputs = {"question": users[-1].encode(), name: value}
    if answers:
        inputs["history"] = json.dumps([list(p) for p in zip(users[:-1], answers)]).encode()
    arrays = {k: np.array([[v]], dtype=np.object_) for k, v in inputs.items()}
    for key, target in NUMBERS.items():
        value = body.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ApiError(f"{key}: expected a number, got {value!r}")
        arrays[target] = np.array([[value]], dtype=np.int32 if target in INTS else np.float32)
    try:
        parse_request(arrays, allow)  # the model's own rules: question, allow-list, ranges
    except InputError as exc:
        raise ApiError(client_message(exc, None, None)) from None
    return arrays


# ---------------------------------------------------------------------------------- the app
def _triton_inputs(grpc, arrays: dict[str, np.ndarray]) -> list:
    tensors = []
    for name in INPUTS:  # config.pbtxt's order
        if name in arrays:
            array = arrays[name]
            kind = "BYTES" if array.dtype == np.object_ else "INT32" if array.dtype == np.int32 else "FP32"
            tensors.append(grpc.InferInput(name, list(array.shape), kind))
            tensors[-1].set_data_from_numpy(array)
    return tensors


def _triton_error(message: str) -> ApiError:
    # The model answers a refused request with one line; its server faults say so in those words.
    message = " ".join(message.split())
    if message.startswith("internal server error") or message == "cancelled":
        return ApiError(message, 500, "server_error")
    return ApiError(message)


def _usage(timings: dict, completion: int) -> dict:
    prompt = int(timings.get("prompt_tokens", 0))
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _finish(completion: int, arrays: dict) -> str:
    limit = arrays.get("max_new_tokens")
    return "length" if limit is not None and completion >= int(limit[0, 0]) else "stop"


def create_app(options: OpenAIOptions):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from tritonclient.grpc import aio as grpc
    from tritonclient.utils import InferenceServerException

    app = FastAPI(title="ppllava (OpenAI-compatible)")
    allow = [Path(d).resolve() for d in options.allow]
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": MODEL_ID, "object": "model", "created": created, "owned_by": "ppllava"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            body = await request.json()
        except json.JSONDecodeError as exc:
            raise ApiError(f"the request body is not JSON ({exc.msg} at position {exc.pos})") from None
        arrays = chat_inputs(body, allow, options.max_data_bytes)
        reply_id, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        client = grpc.InferenceServerClient(options.triton_grpc)
        if not body.get("stream"):
            try:
                result = await client.infer(MODEL_ID, _triton_inputs(grpc, arrays))
            except InferenceServerException as exc:
                raise _triton_error(exc.message()) from None
            finally:
                await client.close()
            text = result.as_numpy("answer")[0, 0].decode()
            completion = result.as_numpy("token_ids").shape[-1]
            timings = json.loads(result.as_numpy("timings")[0, 0])
            return {"id": reply_id, "object": "chat.completion", "created": now, "model": MODEL_ID,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": _finish(completion, arrays)}],
                    "usage": _usage(timings, completion)}
        return await _stream(client, arrays, body, reply_id, now)

    async def _stream(client, arrays, body, reply_id, now):
        async def requests():
            yield {"model_name": f"{MODEL_ID}_stream", "inputs": _triton_inputs(grpc, arrays)}

        responses = client.stream_infer(requests())
        # The first response is awaited before the reply starts, so that a video the model cannot
        # decode is still a 400 rather than an error in the middle of a 200 stream.
        try:
            first = await responses.__anext__()
        except (StopAsyncIteration, InferenceServerException) as exc:
            await client.close()
            raise ApiError(f"the model ended the stream without an answer ({exc})", 500, "server_error") from None
        if first[1] is not None:
            await client.close()
            raise _triton_error(first[1].message())
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def chunk(delta: dict, finish=None, usage=None) -> str:
            data = {"id": reply_id, "object": "chat.completion.chunk", "created": now, "model": MODEL_ID,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            if usage is not None:
                data["usage"], data["choices"] = usage, []
            return f"data: {json.dumps(data)}\n\n"

        async def events():
            try:
                yield chunk({"role": "assistant", "content": ""})
                pending = first
                while pending is not None:
                    result, error = pending
                    if error is not None:
                        yield f"data: {json.dumps(_triton_error(error.message()).body())}\n\n"
                        break
                    ids = result.as_numpy("token_ids")
                    if ids is None:
                        yield chunk({"content": result.as_numpy("text")[0, 0].decode()})
                    else:  # the final response: token ids and timings
                        completion = ids.shape[-1]
                        yield chunk({}, _finish(completion, arrays))
                        if include_usage:
                            yield chunk({}, usage=_usage(json.loads(result.as_numpy("timings")[0, 0]), completion))
                        break
                    pending = await responses.__anext__()
                yield "data: [DONE]\n\n"
            finally:  # also when the client goes away: cancelling the call cancels the generation
                responses.cancel()
                await client.close()

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


# ---------------------------------------------------------------------------------- lifecycle
class OpenAIFrontEnd:
    """uvicorn on a helper thread; ``stop()`` ends it (the requests in flight finish first)."""

    def __init__(self, options: OpenAIOptions):
        try:
            import uvicorn
        except ImportError:
            raise PPLLaVAError("the OpenAI front end needs fastapi and uvicorn: pip install 'ppllava[serve]' "
                               "(or pass --openai-port 0)") from None
        self.options = options
        config = uvicorn.Config(create_app(options), host=options.host, port=options.port, log_level="warning",
                                access_log=False, lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="ppllava-openai", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.options.host}:{self.options.port}/v1"

    def start(self, timeout: float = 30.0) -> "OpenAIFrontEnd":
        self.thread.start()  # off the main thread, uvicorn leaves the signal handlers to serve()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise PPLLaVAError(f"the OpenAI front end could not listen on {self.options.host}:{self.options.port} "
                                   "(port in use? choose another with --openai-port)")
            time.sleep(0.05)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(timeout)
