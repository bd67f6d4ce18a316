"""`ppllava ask URL VIDEO QUESTION`: the CLI as a client of a `ppllava serve` server, through its
OpenAI-compatible endpoint. Standard library only (no torch, no numpy), so any machine can ask."""

from __future__ import annotations

import base64
import json
import mimetypes
import urllib.error
import urllib.request
from pathlib import Path

from ppllava.errors import InputError

UPLOAD_LIMIT = 64 * 2**20  # the server's default --max-data-mib; larger files go by path (its --allow)


def is_url(text) -> bool:
    return isinstance(text, str) and text.startswith(("http://", "https://"))


def _endpoint(url: str) -> str:
    base = url.rstrip("/")
    return base + ("/chat/completions" if base.endswith("/v1") else "/v1/chat/completions")


def _media(video: Path) -> dict:
    """The video as a content part: uploaded (data: URL) up to the server's limit, else by path,
    which the server accepts only under one of its --allow directories."""
    kind = "image_url" if (mimetypes.guess_type(video.name)[0] or "").startswith("image/") else "video_url"
    if video.stat().st_size <= UPLOAD_LIMIT:
        mime = mimetypes.guess_type(video.name)[0] or "application/octet-stream"
        url = f"data:{mime};base64," + base64.b64encode(video.read_bytes()).decode()
    else:
        url = video.resolve().as_uri()
    return {"type": kind, kind: {"url": url}}


def ask_server(url: str, video: Path, question: str, history=(), on_text=None, timeout: float = 600,
               **options) -> dict:
    """Stream an answer from the server; returns {"answer", "usage", "server"}. ``options``:
    max_new_tokens, temperature, top_p, seed, frames, start, end, tokens (None: the server's default)."""
    messages = []
    for i, (q, a) in enumerate([*history, (question, None)]):  # the media goes with the first user turn
        messages.append({"role": "user", "content": [_media(video), {"type": "text", "text": q}] if i == 0 else q})
        if a is not None:
            messages.append({"role": "assistant", "content": a})
    body = {"model": "ppllava", "messages": messages, "stream": True, "stream_options": {"include_usage": True}}
    names = {"max_new_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p", "seed": "seed",
             "frames": "frames", "start": "start", "end": "end", "tokens": "tokens"}
    body.update({names[k]: v for k, v in options.items() if v is not None and k in names})
    request = urllib.request.Request(_endpoint(url), data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", "Accept": "text/event-stream"})
    pieces, usage = [], None
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            for raw in response:
                line = raw.decode("utf-8", "replace").strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("error"):
                    raise InputError(f"the server refused: {chunk['error'].get('message', chunk['error'])}")
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices", []):
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        pieces.append(text)
                        if on_text is not None:
                            on_text(text)
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read().decode())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = f"HTTP {exc.code} {exc.reason}"
        raise InputError(f"the server refused: {message}") from None
    except urllib.error.URLError as exc:
        raise InputError(f"cannot reach {url}: {exc.reason} (is `ppllava serve` running there?)") from None
    except (TimeoutError, ConnectionError) as exc:
        raise InputError(f"the connection to {url} failed: {exc}") from None
    return {"answer": "".join(pieces).strip(), "usage": usage, "server": url}
