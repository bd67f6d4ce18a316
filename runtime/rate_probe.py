"""The machine's rates (``floors``) measured again between the bench's repeats, so that each repeat
is judged against what the machine could do at that moment.

On a shared machine (a cloud VM) the GEMM rate and the memory bandwidth move by tens of percent
within seconds; a median over a minute against the best of one moment mixes that into the ratio.
The probe runs in a helper process (``python -m ppllava.runtime.rate_probe THREADS``) on the same
threads, so its 256 MiB of weights stay out of the bench's memory figures; between probes the helper
waits on its pipe (no spinning threads). The protocol is one line each way: the parent writes a
repeat count, the helper answers with one JSON line of rates, so a ``select`` on the pipe followed by
one ``readline`` never waits on a half line.
"""

from __future__ import annotations

import json
import logging
import select
import subprocess
import sys
import tempfile
from dataclasses import asdict

log = logging.getLogger(__name__)

PROBE_REPEAT = 3  # best of 3 of each product: ~0.15 s a probe
START_TIMEOUT_S = 120.0  # importing onnxruntime, building the session and its 256 MiB feed
PROBE_TIMEOUT_S = 15.0


class RateProbe:
    """``probe()`` returns {"gemm_gflops", "bandwidth_gbs"} measured now, or None once the helper has
    failed (said once, with its reason, in a warning): the floors then use the rates measured after
    the runs. ``command``: the helper (tests give another)."""

    def __init__(self, threads: int | None, repeat: int = PROBE_REPEAT, command: list[str] | None = None,
                 probe_timeout_s: float = PROBE_TIMEOUT_S):
        self.repeat, self.probe_timeout_s = repeat, probe_timeout_s
        self.proc = None
        self.errors = tempfile.TemporaryFile(mode="w+")  # the helper's stderr, read when it fails
        try:
            self.proc = subprocess.Popen(command or [sys.executable, "-m", "ppllava.runtime.rate_probe", str(threads or 0)],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.errors, text=True)
            if self._line(START_TIMEOUT_S) != "ready":
                self._fail("it did not start", kill=True)
        except OSError as exc:
            self._fail(str(exc))
        except BaseException:  # Ctrl-C while it starts: nothing of it may outlive the bench
            self.close(kill=True)
            self.errors.close()
            raise

    def _line(self, timeout_s: float) -> str | None:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        return self.proc.stdout.readline().strip() if ready else None

    def _fail(self, why: str, kill: bool = False) -> None:
        self.close(kill)
        self.errors.seek(0)
        last = (self.errors.read().strip().splitlines() or [""])[-1]
        log.warning("the rate probe stopped (%s%s): the floors use the rates measured after the runs",
                    why, f"; {last}" if last else "")

    def __call__(self) -> dict | None:
        if self.proc is None:
            return None
        try:
            self.proc.stdin.write(f"{self.repeat}\n")
            self.proc.stdin.flush()
            line = self._line(self.probe_timeout_s)
            if line is None:
                self._fail(f"no answer in {self.probe_timeout_s:g} s", kill=True)  # stuck: it would not read EOF
                return None
            rates = json.loads(line)
            return {"gemm_gflops": float(rates["gemm_gflops"]), "bandwidth_gbs": float(rates["bandwidth_gbs"])}
        except (OSError, ValueError, TypeError, KeyError) as exc:  # a dead helper's pipe, or a garbled answer
            self._fail(f"{type(exc).__name__}: {exc}")
            return None

    def close(self, kill: bool = False) -> None:
        """End the helper: at the end of its input, or (``kill``, or when it does not end) killed."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            if kill:
                proc.kill()
            proc.stdin.close()
            proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()
        finally:
            proc.stdout.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
        self.errors.close()


def serve(threads: int) -> None:
    """The helper: one line in (the repeat count), one JSON line of ``floors.Rates`` out, until its
    input closes."""
    from ppllava.runtime.floors import Rater

    rater = Rater(threads or None)
    print("ready", flush=True)
    for line in sys.stdin:
        print(json.dumps(asdict(rater.rates(int(line)))), flush=True)


if __name__ == "__main__":
    serve(int(sys.argv[1]))
