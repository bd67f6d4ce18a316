"""The Triton python-backend model that wraps ``Pipeline``: copied as ``<model>/1/model.py`` by
``ppllava triton-repo``, and the same file runs in NVIDIA's tritonserver containers (with ppllava
installed there). Config parameters: ``engine_dir``, ``backend``, ``allow`` (JSON list of
directories), optional ``threads``, and ``site_dirs`` (JSON list; ``ppllava serve`` sets it so that
the stub's embedded interpreter sees the serving venv, editable installs included).

A decoupled model config (``ppllava_stream``) streams: one response per text piece (``text``), then
a final one with ``token_ids`` and ``timings``. Otherwise one response per request with ``answer``,
``token_ids`` and ``timings``. A refused request gets its own ``TritonError`` (INVALID_ARG, one
line); its batch-mates are answered as if it had not been there.
"""

import json
import logging
import shutil
import site
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

log = logging.getLogger("ppllava.serving")


def _parameter(config: dict, key: str, default=None):
    value = config.get("parameters", {}).get(key, {}).get("string_value")
    return default if value in (None, "") else value


class _Cancel:
    """``Pipeline.ask``'s cancel event: set once Triton cancels the request (client gone, server
    stopping) or the stream's sender fails."""

    def __init__(self, request):
        self.request, self.failed = request, False

    def is_set(self) -> bool:
        return self.failed or bool(self.request.is_cancelled())


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        for directory in json.loads(_parameter(config, "site_dirs", "[]")):
            site.addsitedir(directory)  # before the first ppllava import
        from ppllava.runtime.pipeline import Pipeline

        if int(np.__version__.split(".")[0]) >= 2:
            log.warning("numpy %s in the python-backend stub: Triton 2.51's stub needs numpy < 2 for BYTES "
                        "inputs (install ppllava[serve]; newer tritonserver releases may not)", np.__version__)

        threads = _parameter(config, "threads")
        self.pipe = Pipeline.open(_parameter(config, "engine_dir"), backend=_parameter(config, "backend", "onnxruntime"),
                                  threads=None if threads is None else int(threads))
        self.allow = [Path(d).resolve() for d in json.loads(_parameter(config, "allow", "[]"))]
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)
        self.uploads = Path(tempfile.mkdtemp(prefix="ppllava-uploads-"))  # mode 0700: private to this process
        self.pool = ThreadPoolExecutor(max(int(config.get("max_batch_size", 1)), 1), thread_name_prefix="ppllava")
        self.running: set = set()
        self.lock = threading.Lock()

    # ------------------------------------------------------------------ one request
    def _inputs(self, request) -> dict:
        return {t.name(): t.as_numpy() for t in request.inputs()}

    def _ask(self, request, on_text=None, cancel=None):
        """(Answer, None) or (None, TritonError)."""
        from ppllava.errors import Cancelled, InputError
        from ppllava.runtime.serving.request import client_message, parse_request

        parsed = upload = None
        try:
            parsed = parse_request(self._inputs(request), self.allow)
            with parsed.video_file(self.uploads) as video:
                upload = video if parsed.video is None else None
                return self.pipe.ask(video, parsed.question, on_text=on_text, cancel=cancel, **parsed.options), None
        except InputError as exc:
            return None, pb_utils.TritonError(client_message(exc, parsed, upload), pb_utils.TritonError.INVALID_ARG)
        except Cancelled:
            return None, pb_utils.TritonError("cancelled", pb_utils.TritonError.CANCELLED)
        except Exception:  # a server fault: logged here in full, one line to the client
            log.exception("ppllava request failed")
            return None, pb_utils.TritonError("internal server error (see the server log)", pb_utils.TritonError.INTERNAL)

    @staticmethod
    def _summary(answer) -> list:
        timings = answer.as_dict()
        del timings["answer"], timings["token_ids"]
        return [pb_utils.Tensor("token_ids", np.asarray([answer.token_ids], dtype=np.int32)),
                pb_utils.Tensor("timings", np.asarray([[json.dumps(timings).encode()]], dtype=np.object_))]

    def _respond(self, request):
        answer, error = self._ask(request)
        if error is not None:
            return pb_utils.InferenceResponse(output_tensors=[], error=error)
        text = pb_utils.Tensor("answer", np.asarray([[answer.text.encode()]], dtype=np.object_))
        return pb_utils.InferenceResponse(output_tensors=[text, *self._summary(answer)])

    def _stream(self, request):
        sender = request.get_response_sender()
        cancel = _Cancel(request)

        def piece(text: str) -> None:
            try:
                sender.send(pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor("text", np.asarray([[text.encode()]], dtype=np.object_))]))
            except Exception:  # the client went away: stop decoding for it
                cancel.failed = True

        try:
            answer, error = self._ask(request, on_text=piece, cancel=cancel)
            response = (pb_utils.InferenceResponse(output_tensors=[], error=error) if error is not None
                        else pb_utils.InferenceResponse(output_tensors=self._summary(answer)))
            sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception:
            log.exception("ppllava stream could not be finished")
        finally:
            with self.lock:
                self.running.discard(threading.current_thread())

    # ------------------------------------------------------------------ Triton's entry points
    def execute(self, requests):
        if not self.decoupled:
            # Requests of one batch run side by side: the Pipeline overlaps one's vision stage with
            # another's decoding, and each gets exactly the answer it would get alone.
            return list(self.pool.map(self._respond, requests))
        for request in requests:  # decoupled: answered from threads, execute returns at once
            thread = threading.Thread(target=self._stream, args=(request,), name="ppllava-stream", daemon=True)
            with self.lock:
                self.running.add(thread)
            thread.start()
        return None

    def finalize(self):
        with self.lock:
            threads = list(self.running)
        for thread in threads:
            thread.join()
        self.pool.shutdown(wait=True)
        self.pipe.close()
        shutil.rmtree(self.uploads, ignore_errors=True)
