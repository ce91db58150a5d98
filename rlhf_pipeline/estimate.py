"""`rlhf-pipeline estimate`: will this recipe fit? Peak memory per device, from the model's config.json alone.

    rlhf-pipeline estimate recipes/llama-3.1-8b-qlora/sft.yaml --gpu-memory 24GB
    rlhf-pipeline estimate recipes/mistral-7b-lora/sft.yaml --num-gpus 8 --gpu-memory 80GB --zero 3
    rlhf-pipeline estimate recipes/smollm2-135m/sft.yaml --cpu --json

No weights are read and nothing heavy is imported (no torch): the architecture comes from `config.json`
(embedded alias → its converted cache folder; local folder; finished stage output → its base; Hub id →
the local Hugging Face cache). The verdict re-runs the estimate with each candidate change (and their
combinations) and names the cheapest one that fits.

The model, in bytes, per device (T = micro-batch × sequence tokens, L layers, h hidden, a/kv heads of
size d, I MLP width, V vocabulary, r LoRA rank; ab = activation bytes: 4 fp32 on CPU, 2 bf16 on GPUs):

- weights: linears in the blocks at dtype bytes, or 4-bit NF4 = 0.5 B + block scales (one fp32 absmax
  per 64 weights = 0.0625 B; with double quantization an 8-bit absmax + one fp32 per 256 blocks =
  0.0159 B), or 8-bit = 1 B + one fp32 scale per output row. Embeddings, lm_head and norms stay
  unquantized, and `prepare_model_for_kbit_training` casts them to fp32 for QLoRA training.
- LoRA: r × (in + out) per targeted linear (`all-linear` = every linear of the blocks, not lm_head), plus
  full trainable copies of `modules_to_save` (the reward/value `score` head). PEFT keeps adapters in fp32.
- trainable state: gradient (param bytes) + AdamW m and v (2 × fp32) + an fp32 master copy when the
  trainable weights are 16-bit and DeepSpeed runs the optimizer; pure-bf16 training without DeepSpeed
  keeps bf16 states instead (2 + 2 + 4 B/param).
- ZeRO: stage 1 shards optimizer states (and masters) over the N processes, stage 2 also gradients, stage
  3 also weights (plus two gathered layers as working set); CPU offload moves optimizer states (and for
  stage 3 weights) to host RAM, shown on a separate line.
- activations: what autograd keeps for backward over one micro-batch, checked tensor by tensor with
  saved-tensor hooks on SmolLM2 and the tiny test Llama. Per token and decoder layer, in bytes:
      2·(4h + 4)              two RMSNorms: fp32 input (a copy under bf16) and rsqrt
    + ab·(2·a·d + 2·kv')      rotated q, attention output, k and v (kv' = a·d: a mask stops SDPA's native
                              GQA, so k and v are repeated to every head; kv·d with flash_attention_2)
    + 4a + ab·w               SDPA's log-sum-exp, and the float copy of the mask it makes in every layer
                              (w = s for padded rows, b·s for padding-free packing: one flattened row
                              with a block-diagonal mask; 0 with flash_attention_2)
    + ab·3I                   gate, SiLU(gate), up
    + ab·(2h + I)             norm outputs and down_proj's input, when something keeps them (LoRA
                              without dropout, a 4/8-bit base, full fine-tuning)
    + Σ adapters: ab·r, plus with dropout a dropped copy of the input and its mask (1 B/value on GPUs,
      an fp32 noise tensor on CPU), or under bf16 autocast the cast copy of the fp32-cast input.
  Eager attention keeps the softmax instead: a·w·(4 + ab). This is Korthikanti et al.'s
  s·b·h·(34 + 5·a·s/h) (fp16, GPT blocks with dropout) re-derived for Llama blocks, SDPA, LoRA and fp32;
  the quadratic term survives only as SDPA's per-layer mask copy. With activation checkpointing each
  layer keeps its input (ab·h) and one layer is recomputed at a time.
- LM head / loss: TRL's SFT never builds the b·s·V logits (a fused, chunked log-prob head): on GPUs one
  [min(T, 4096) × min(V, 32768)] tile in the compute dtype; on CPU its torch fallback holds ~8.25 fp32
  tiles during backward. Our PPO materialises the response logits b·(R+1)·V: logits, /temperature,
  fp32 log-softmax and its gradients (3 × 4 + ab bytes per value) while training.
- PPO holds one copy of the base and four adapters on it (reference, policy, reward model, critic) plus two
  scalar heads; the policy and critic adapters and the value head train. Peak = the base + adapters +
  trainable states + the largest phase: generation (KV cache 2·L·kv·d·(prompt + response)·chunk·ab +
  prefill), scoring (no-grad forwards of one role at a time; one role's response logits), optimisation
  (one role's activations of a micro-batch, since the policy's backward runs before the critic's forward,
  plus the response logits).
- runtime: CUDA context and allocator slack on GPUs (0.8 GiB); on CPU the libraries (~0.5 GiB) and an
  allowance of 0.5 × (activations + loss temporaries) for the freed temporaries glibc's heap keeps
  resident (0 to 1.8 GiB measured on SmolLM2; none with MALLOC_MMAP_THRESHOLD_=65536).

Checked on this CPU (benchmarks/memory_probe.py, MALLOC_MMAP_THRESHOLD_=65536 so RSS follows the live
tensors): SmolLM2-135M SFT steps at 8×128, 4×128, 2×512 tokens, with and without LoRA dropout and with
activation checkpointing, all within 5% of the prediction; the tiny test Llama within 12%.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf_pipeline.errors import PipelineError

if TYPE_CHECKING:
    from rlhf_pipeline.recipe import Recipe

GIB = 2**30
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_NF4_BLOCK = 64  # bitsandbytes' 4-bit block size: one absmax per 64 weights
_DQ_BLOCK = 256  # double quantization: absmaxes quantized to 8 bits in blocks of 256, one fp32 each
_FUSED_TOKENS, _FUSED_VOCAB = 4096, 32768  # TRL's chunked log-prob head tile
_CPU_FUSED_TILES = 8.25  # fp32 tile-sized temporaries of its torch fallback during backward (measured)
_CPU_HEAP_RETENTION = 0.5  # glibc keeps freed temporaries resident: an allowance, see _runtime_rows
_CPU_LIBRARIES = 0.5 * GIB  # torch + transformers + TRL + PEFT + datasets + deepspeed, resident
_GPU_RUNTIME = 0.8 * GIB  # CUDA context, cuBLAS workspace, caching-allocator slack
_TRAINING_STAGES = ("sft", "rm", "ppo")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9]")  # org/name; dots allowed (Llama-3.1-8B)
_UNITS = {"": GIB, "B": 1, "K": 2**10, "KB": 2**10, "KIB": 2**10, "M": 2**20, "MB": 2**20, "MIB": 2**20,
          "G": GIB, "GB": GIB, "GIB": GIB, "T": 2**40, "TB": 2**40, "TIB": 2**40}


# --------------------------------------------------------------------------------------- architecture

@dataclass(frozen=True)
class Linear:
    """One linear layer of a decoder block, as PEFT sees it (`name` is the module's own name)."""

    name: str
    path: str  # e.g. self_attn.q_proj, for regex target_modules
    n_in: int
    n_out: int
    copies: int = 1  # MoE experts


@dataclass(frozen=True)
class Architecture:
    """What memory depends on, read from config.json (decoder-only, Llama-style blocks)."""

    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    num_experts: int = 1
    experts_per_token: int = 1
    fused_projections: bool = False  # phi3: qkv_proj and gate_up_proj
    source: str = ""

    @classmethod
    def from_config(cls, config: dict[str, Any], source: str = "") -> Architecture:
        """Read the fields every Llama-family config.json has (text_config for multimodal ones)."""
        text = config.get("text_config") or config
        try:
            hidden = int(text["hidden_size"])
            heads = int(text["num_attention_heads"])
            return cls(
                model_type=str(text.get("model_type") or config.get("model_type", "unknown")),
                hidden_size=hidden,
                num_layers=int(text["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(text.get("num_key_value_heads") or heads),
                head_dim=int(text.get("head_dim") or hidden // heads),
                intermediate_size=int(text.get("intermediate_size") or 4 * hidden),
                vocab_size=int(text["vocab_size"]),
                tie_word_embeddings=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
                num_experts=int(text.get("num_local_experts") or text.get("num_experts") or 1),
                experts_per_token=int(text.get("num_experts_per_tok") or 1),
                fused_projections=str(text.get("model_type", "")).startswith("phi3"),
                source=source,
            )
        except KeyError as err:
            raise PipelineError(f"{source or 'config.json'}: no {err.args[0]}; the estimator reads decoder-only "
                                "transformer configs (Llama, Mistral, Qwen, Gemma, Phi-3, ...)") from None

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def block_linears(self) -> list[Linear]:
        """The linear layers of one decoder block, with PEFT's module names."""
        h, inter, experts = self.hidden_size, self.intermediate_size, self.num_experts
        if self.fused_projections:
            attention = [Linear("qkv_proj", "self_attn.qkv_proj", h, self.q_dim + 2 * self.kv_dim),
                         Linear("o_proj", "self_attn.o_proj", self.q_dim, h)]
            mlp = [Linear("gate_up_proj", "mlp.gate_up_proj", h, 2 * inter),
                   Linear("down_proj", "mlp.down_proj", inter, h)]
        else:
            attention = [Linear("q_proj", "self_attn.q_proj", h, self.q_dim),
                         Linear("k_proj", "self_attn.k_proj", h, self.kv_dim),
                         Linear("v_proj", "self_attn.v_proj", h, self.kv_dim),
                         Linear("o_proj", "self_attn.o_proj", self.q_dim, h)]
            mlp = [Linear(name, f"mlp.{name}", n_in, n_out, experts)
                   for name, n_in, n_out in (("gate_proj", h, inter), ("up_proj", h, inter), ("down_proj", inter, h))]
            if experts > 1:
                mlp.append(Linear("gate", "mlp.gate", h, experts))  # the router
        return attention + mlp

    @property
    def block_linear_params(self) -> int:
        return self.num_layers * sum(lin.n_in * lin.n_out * lin.copies for lin in self.block_linears())

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def norm_params(self) -> int:
        return (2 * self.num_layers + 1) * self.hidden_size

    def total_params(self, head: str = "lm") -> int:
        """All parameters; head: 'lm' (causal LM, lm_head unless tied) or 'score' (one-label classifier)."""
        head_params = (0 if self.tie_word_embeddings else self.embedding_params) if head == "lm" else self.hidden_size
        return self.block_linear_params + self.embedding_params + self.norm_params + head_params


def targeted_linears(arch: Architecture, targets: str | list[str]) -> list[Linear]:
    """The block linears a LoRA `target_modules` selects (PEFT: `all-linear`, names by suffix, or a regex)."""
    linears = arch.block_linears()
    if targets == "all-linear":
        return linears
    if isinstance(targets, str):
        pattern = re.compile(targets)
        return [lin for lin in linears if pattern.fullmatch(f"model.layers.0.{lin.path}")]
    return [lin for lin in linears if lin.name in targets or lin.path in targets]


# ------------------------------------------------------------------------------------- config lookup

def _read_config(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def find_config(name_or_path: str, revision: str | None = "main") -> tuple[dict[str, Any], str]:
    """config.json of a model source (embedded alias, folder, finished stage output, Hub id), without weights."""
    from rlhf_pipeline import embedded
    from rlhf_pipeline.outputs import read_manifest

    if embedded.is_embedded(name_or_path):
        folder = embedded.model_dir(name_or_path)
        if not (folder / "config.json").is_file():
            raise PipelineError(f"model.name_or_path: the embedded model '{name_or_path}' is not converted yet "
                                f"(no {folder / 'config.json'}); run any stage with it once (the first run "
                                "converts it in ~35 s), then estimate")
        return _read_config(folder / "config.json"), str(folder)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        manifest = read_manifest(path)
        if manifest is not None:  # a finished stage: its base (stage adapters do not change shapes)
            base = manifest.base_model
            if str(base.get("path")) == str(path):
                return _read_config(path / "config.json"), str(path)
            return find_config(str(base["path"]), base.get("revision"))
        if (path / "config.json").is_file():
            return _read_config(path / "config.json"), str(path / "config.json")
        raise PipelineError(f"model.name_or_path: {path} has no config.json and is not a finished stage")
    if not _HUB_ID.fullmatch(name_or_path):
        raise PipelineError(f"model.name_or_path: '{name_or_path}' does not exist yet; the estimate needs the "
                            "base model's config.json: pass --base MODEL (the model that stage starts from)")
    return _hub_config(name_or_path, revision or "main"), f"{name_or_path} (Hugging Face cache)"


def _hub_config(repo_id: str, revision: str) -> dict[str, Any]:
    """A Hub model's config.json from the local cache; downloaded (one small file) only when online."""
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache

    cache_dir = os.environ.get("HF_HUB_CACHE") or None
    cached = try_to_load_from_cache(repo_id, "config.json", revision=revision, cache_dir=cache_dir)
    if isinstance(cached, str):
        return _read_config(Path(cached))
    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    if offline:
        raise PipelineError(f"model.name_or_path: the config.json of '{repo_id}' is not in the local Hugging Face "
                            "cache and HF_HUB_OFFLINE=1 forbids downloading it; run `hf download "
                            f"{repo_id} config.json` where there is network, or pass --base with a local folder")
    try:
        return _read_config(Path(hf_hub_download(repo_id, "config.json", revision=revision, cache_dir=cache_dir)))
    except Exception as err:
        raise PipelineError(f"model.name_or_path: could not fetch the config.json of '{repo_id}' ({err}); "
                            "download it first or pass --base with a local folder") from None


# ---------------------------------------------------------------------------------------------- setup

@dataclass(frozen=True)
class Setup:
    """Everything the estimate depends on: the model, the stage's shapes, the hardware and the parallelism."""

    stage: str
    arch: Architecture
    device: str = "gpu"  # gpu | cpu
    num_devices: int = 1
    device_memory: float = 80 * GIB
    dtype: str = "bfloat16"  # weights as loaded
    mixed_precision: bool = True  # activations in bf16/fp16 on GPUs
    quantization: str | None = None  # None | 4bit | 8bit
    double_quant: bool = True
    lora_r: int | None = 16  # None: full fine-tuning
    lora_targets: str | list[str] = "all-linear"
    lora_layers: tuple[int, ...] | None = None  # layers_to_transform; None: every block
    lora_dropout: float = 0.05
    modules_to_save: tuple[str, ...] = ()
    micro_batch: int = 8
    grad_accum: int = 1
    seq_len: int = 1024  # sft/rm: data.max_length; ppo: prompt + response
    checkpointing: bool = False
    attn: str = "sdpa"
    packing: bool = False
    zero: int = 0
    offload_optimizer: bool = False
    offload_params: bool = False
    # PPO
    response_length: int = 0
    rollout_batch: int = 0
    forward_chunk: int = 0

    @property
    def act_bytes(self) -> int:
        """Bytes per activation value: the loaded dtype, or 2 under bf16/fp16 autocast on GPUs."""
        return 2 if self.device == "gpu" and self.mixed_precision else _DTYPE_BYTES[self.dtype]

    @property
    def weight_bytes(self) -> int:
        return _DTYPE_BYTES[self.dtype]

    def describe(self) -> str:
        method = "sampling" if self.stage not in _TRAINING_STAGES else "full fine-tuning" if self.lora_r is None else (
            f"{'QLoRA ' + self.quantization if self.quantization else 'LoRA'} r={self.lora_r}")
        zero = f", ZeRO-{self.zero}" if self.zero else ""
        offload = ", optimizer offload" if self.offload_optimizer else ""
        offload += ", parameter offload" if self.offload_params else ""
        hardware = (f"{self.num_devices} × {'GPU' if self.device == 'gpu' else 'CPU'} "
                    f"{self.device_memory / GIB:.0f} GiB")
        shape = f"micro-batch {self.micro_batch} × {self.seq_len} tokens"
        if self.stage == "ppo":
            shape += f" (response {self.response_length}), rollout {self.rollout_batch}"
        shape += ", packed (padding-free)" if self.packing else ""
        ckpt = ", activation checkpointing" if self.checkpointing else ""
        return f"{self.stage}: {method}, {self.dtype}, {self.attn}; {shape}{ckpt}; {hardware}{zero}{offload}"


# ------------------------------------------------------------------------------------------- estimate

@dataclass
class Row:
    """One line of the breakdown (bytes per device); `host` rows live in CPU RAM (offload), not on the device."""

    name: str
    bytes: float
    detail: str = ""
    host: bool = False


@dataclass
class Estimate:
    setup: Setup
    rows: list[Row]
    phase: str = "training"
    phases: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> float:
        """Predicted peak per device, runtime included."""
        return sum(r.bytes for r in self.rows if not r.host)

    @property
    def model_peak(self) -> float:
        """The peak without the runtime line: what the model, its states and activations take."""
        return sum(r.bytes for r in self.rows if not r.host and not r.name.startswith("runtime"))

    @property
    def host_bytes(self) -> float:
        return sum(r.bytes for r in self.rows if r.host)

    @property
    def fits(self) -> bool:
        return self.peak <= self.setup.device_memory

    def as_dict(self) -> dict[str, Any]:
        return {"setup": self.setup.describe(), "stage": self.setup.stage, "peak_bytes": self.peak,
                "model_peak_bytes": self.model_peak, "device_memory_bytes": self.setup.device_memory,
                "fits": self.fits, "peak_phase": self.phase, "host_offload_bytes": self.host_bytes,
                "phases_bytes": self.phases, "notes": self.notes,
                "rows": [dataclasses.asdict(r) for r in self.rows]}


def _quantized_linear_bytes(setup: Setup, params: int, rows: int) -> float:
    if setup.quantization == "4bit":
        per_param = 0.5 + (1 / _NF4_BLOCK + 4 / (_NF4_BLOCK * _DQ_BLOCK) if setup.double_quant else 4 / _NF4_BLOCK)
        return params * per_param
    if setup.quantization == "8bit":
        return params + 4 * rows
    return params * setup.weight_bytes


def weight_rows(setup: Setup, arch: Architecture, head: str, label: str, training: bool = True) -> list[Row]:
    """Frozen or trainable base weights of one model copy (before ZeRO-3 sharding)."""
    linear_params = arch.block_linear_params
    out_rows = arch.num_layers * sum(lin.n_out * lin.copies for lin in arch.block_linears())
    head_params = (0 if arch.tie_word_embeddings else arch.embedding_params) if head == "lm" else arch.hidden_size
    other = arch.embedding_params + head_params + arch.norm_params
    if setup.quantization:
        kind = ("4-bit NF4" + (" + double-quant" if setup.double_quant else "")
                if setup.quantization == "4bit" else "8-bit")
        other_bytes = 4 if training and setup.lora_r is not None else setup.weight_bytes  # k-bit prep: fp32
        return [Row(f"weights {label}(linears, {kind})", _quantized_linear_bytes(setup, linear_params, out_rows),
                    f"{linear_params / 1e9:.2f}B params"),
                Row(f"weights {label}(embeddings, head, norms)", other * other_bytes,
                    f"{other / 1e6:.0f}M params × {other_bytes} B (kept unquantized"
                    + (", fp32 after k-bit preparation)" if other_bytes == 4 else ")"))]
    total = linear_params + other
    return [Row(f"weights {label}".strip(), total * setup.weight_bytes,
                f"{total / 1e9:.3f}B params × {setup.weight_bytes} B")]


def adapted_and_reached_layers(setup: Setup, arch: Architecture) -> tuple[int, int]:
    """Blocks that carry the adapter, and blocks the backward pass reaches (from the lowest adapted one up)."""
    if setup.lora_r is None or not setup.lora_layers:
        return arch.num_layers, arch.num_layers
    return len(set(setup.lora_layers)), arch.num_layers - min(setup.lora_layers)


def lora_params(setup: Setup, arch: Architecture, head: str) -> int:
    """Trainable parameters of the adapter: r·(in+out) per targeted linear, plus modules_to_save copies."""
    if setup.lora_r is None:
        return arch.total_params(head)
    count = adapted_and_reached_layers(setup, arch)[0] * sum(setup.lora_r * (lin.n_in + lin.n_out) * lin.copies
                                  for lin in targeted_linears(arch, setup.lora_targets))
    for name in setup.modules_to_save:
        count += arch.hidden_size if name in ("score", "classifier") else (
            arch.embedding_params if name in ("lm_head", "embed_tokens") else 0)
    return count


def trainable_rows(setup: Setup, params: int, label: str) -> list[Row]:
    """Adapter weights (LoRA only; full fine-tuning weights are in the weights row), gradients, AdamW states."""
    n = max(setup.num_devices, 1)
    lora = setup.lora_r is not None
    param_bytes = 4 if lora else setup.weight_bytes  # PEFT keeps adapters in fp32
    deepspeed = setup.zero > 0
    master = param_bytes < 4 and deepspeed
    state_bytes = 8 if (param_bytes == 4 or deepspeed) else 2 * param_bytes
    grad_share = n if setup.zero >= 2 else 1
    opt_share = n if setup.zero >= 1 else 1
    rows = []
    if lora:
        rows.append(Row(f"LoRA parameters {label}".strip(), params * 4 / (n if setup.zero >= 3 else 1),
                        f"{params / 1e6:.2f}M params, fp32"))
    rows.append(Row(f"gradients {label}".strip(), params * param_bytes / grad_share,
                    f"{param_bytes} B/param" + (f", ZeRO-{setup.zero} /{n}" if grad_share > 1 else "")))
    optimizer = params * (state_bytes + (4 if master else 0)) / opt_share
    what = f"AdamW m+v {state_bytes} B/param" + (" + fp32 master 4 B" if master else "")
    what += f", ZeRO /{n}" if opt_share > 1 else ""
    what += ", offloaded to CPU RAM" if setup.offload_optimizer else ""
    rows.append(Row(f"optimizer {label}".strip(), optimizer, what, host=setup.offload_optimizer))
    return rows


def _layer_bytes_per_token(setup: Setup, arch: Architecture, batch: int, seq: int, lora: bool,
                           dropout: float) -> float:
    """What autograd keeps for one decoder layer, per token of the micro-batch (see the module docstring)."""
    ab = setup.act_bytes
    h, q, kv, inter = arch.hidden_size, arch.q_dim, arch.kv_dim, arch.intermediate_size * arch.experts_per_token
    gpu = setup.device == "gpu"
    # Padded rows carry a padding mask; padding-free packing flattens the micro-batch into one row whose
    # documents are kept apart by a block-diagonal mask over all of it (except with flash attention's varlen).
    span = batch * seq if setup.packing else seq
    repeat = setup.attn != "flash_attention_2" and arch.num_kv_heads != arch.num_heads  # a mask stops native GQA
    kv_saved = q if repeat else kv
    total = 2 * (4 * h + 4)  # two RMSNorms: fp32 input (a copy under bf16) and rsqrt
    total += ab * (q + 2 * kv_saved + q)  # rotated q, k, v as attention saw them, attention output
    if setup.attn == "eager":
        total += arch.num_heads * span * (4 + (ab if ab != 4 else 0))  # fp32 softmax (+ its cast)
    else:
        total += 4 * arch.num_heads  # log-sum-exp
        if setup.attn == "sdpa":
            total += ab * span  # the bool mask, converted to a float bias in every layer
    total += ab * 3 * inter  # gate, SiLU(gate), up
    if arch.num_experts > 1:
        total += 4 * arch.num_experts  # router logits
    targets = {lin.name for lin in targeted_linears(arch, setup.lora_targets)} if lora else set()
    full = not lora
    cast = lora and ab != 4  # fp32 adapters on 16-bit activations: PEFT casts their input to fp32
    inputs = {"attn": h, "out": q, "mlp": h, "down": inter}
    consumers = {"attn": ("q_proj", "k_proj", "v_proj", "qkv_proj"), "out": ("o_proj",),
                 "mlp": ("gate_proj", "up_proj", "gate_up_proj", "gate"), "down": ("down_proj",)}
    for group, width in inputs.items():
        adapters = [name for name in consumers[group] if name in targets]
        shared = full or setup.quantization is not None or (adapters and not dropout and not cast)
        if shared and group != "out":  # the attention output is already counted
            total += ab * width
        for _ in adapters:
            total += ab * setup.lora_r
            if dropout:
                total += width * (ab + (1 if gpu else 4))  # dropped copy + mask (CPU: a float noise tensor)
            elif cast:
                total += width * ab  # the autocast copy of the fp32-cast input
    return total


def activation_bytes(setup: Setup, arch: Architecture, batch: int, seq: int, lora: bool, dropout: float) -> float:
    """Saved activations of one forward+backward over batch × seq tokens (decoder layers + final norm)."""
    tokens = batch * seq
    ab = setup.act_bytes
    layer = _layer_bytes_per_token(setup, arch, batch, seq, lora, dropout)
    outside = 4 * arch.hidden_size + 4 + ab * arch.hidden_size  # final norm input and output
    # Blocks below the lowest adapted one need no gradient, so autograd keeps nothing for them; blocks in
    # between keep what back-propagating through their frozen weights needs, without the adapters' inputs.
    adapted, reached = adapted_and_reached_layers(setup, arch) if lora else (arch.num_layers, arch.num_layers)
    plain = _layer_bytes_per_token(dataclasses.replace(setup, lora_targets=[]), arch, batch, seq, lora, dropout)
    if setup.checkpointing:
        # each layer's input is kept; one layer is recomputed (and back-propagated) at a time
        return tokens * (reached * ab * arch.hidden_size + layer + outside + ab * 2 * arch.intermediate_size)
    return tokens * (adapted * layer + (reached - adapted) * plain + outside)


def fused_head_bytes(setup: Setup, arch: Architecture, tokens: int) -> float:
    """TRL's chunked log-prob head (SFT): tile temporaries and the fp32 hidden-state gradient."""
    tile = min(tokens, _FUSED_TOKENS) * min(arch.vocab_size, _FUSED_VOCAB)
    grad_hidden = tokens * arch.hidden_size * (4 + setup.act_bytes)
    if setup.device == "cpu":
        return _CPU_FUSED_TILES * tile * 4 + grad_hidden
    return tile * setup.act_bytes + grad_hidden


def _runtime_rows(setup: Setup, transient: float) -> list[Row]:
    """What the runtime adds: CUDA context on GPUs; on CPU the libraries and the heap glibc does not hand back.

    glibc's dynamic mmap threshold (up to 32 MiB) puts activation-sized blocks on the heap, and freed
    temporaries between live tensors stay resident: 0 to 1.8 GiB measured on SmolLM2 SFT (benchmarks/
    RESULTS.md). MALLOC_MMAP_THRESHOLD_=65536 in the environment makes RSS follow the live tensors.
    """
    if setup.device == "gpu":
        return [Row("runtime (CUDA context, allocator slack)", _GPU_RUNTIME, "fixed allowance")]
    return [Row("runtime: glibc heap slack", _CPU_HEAP_RETENTION * transient,
                f"{_CPU_HEAP_RETENTION} × (activations + loss temporaries); 0 with MALLOC_MMAP_THRESHOLD_=65536"),
            Row("runtime: libraries (torch, transformers, TRL)", _CPU_LIBRARIES, "resident code and data")]


def _shard_weights(setup: Setup, rows: list[Row], arch: Architecture) -> list[Row]:
    """ZeRO-3 shards weights over the processes (parameter offload: to host RAM) and gathers two layers."""
    if setup.zero < 3:
        return rows
    n = setup.num_devices
    sharded = [Row(r.name, r.bytes / n, r.detail + (" (offloaded)" if setup.offload_params else f", ZeRO-3 /{n}"),
                   host=setup.offload_params) for r in rows]
    layer = arch.block_linear_params / arch.num_layers * setup.weight_bytes
    return [*sharded, Row("ZeRO-3 gathered layers", 2 * layer, "two layers' full weights in flight")]


def estimate(setup: Setup) -> Estimate:
    """Predicted peak memory per device for the setup's stage."""
    if setup.stage == "ppo":
        return _estimate_ppo(setup)
    arch = setup.arch
    head = "score" if setup.stage == "rm" else "lm"
    training = setup.stage in _TRAINING_STAGES
    rows = _shard_weights(setup, weight_rows(setup, arch, head, "", training), arch)
    notes: list[str] = []
    if not training:  # label / eval: sampling only, no gradients
        if setup.stage == "eval":  # the baseline and the policy under test, plus the reward model
            rows = [dataclasses.replace(r, name=r.name.replace("weights", "weights × 2 policies"), bytes=2 * r.bytes)
                    for r in rows]
            rows += [dataclasses.replace(r, name=r.name.replace("weights", "weights reward model"))
                     for r in weight_rows(setup, arch, "score", "", training=False)]
        kv = _kv_cache_bytes(setup, arch, setup.micro_batch, setup.seq_len)
        rows.append(Row("KV cache (generation)", kv, f"batch {setup.micro_batch} × {setup.seq_len} tokens"))
        rows.append(Row("next-token logits", setup.micro_batch * arch.vocab_size * 4 * 2, "fp32, with a softmax"))
        rows += _runtime_rows(setup, 0)
        return Estimate(setup, rows, phase="generation", notes=notes)
    modules = setup.modules_to_save or (("score",) if head == "score" and setup.lora_r is not None else ())
    setup_head = dataclasses.replace(setup, modules_to_save=modules)
    rows += trainable_rows(setup, lora_params(setup_head, arch, head), "")
    batch = setup.micro_batch * (2 if setup.stage == "rm" else 1)  # RewardTrainer: chosen and rejected together
    activations = activation_bytes(setup, arch, batch, setup.seq_len, setup.lora_r is not None, setup.lora_dropout)
    rows.append(Row("activations", activations, f"{batch} × {setup.seq_len} tokens"
                    + (", checkpointed" if setup.checkpointing else "")))
    if setup.stage == "sft":
        head_bytes = fused_head_bytes(setup, arch, batch * (setup.seq_len - 1))
        rows.append(Row("LM head / loss (fused log-prob tiles)", head_bytes, "TRL never builds the full logits"))
    else:
        head_bytes = 0.0
    rows += _runtime_rows(setup, activations + head_bytes)
    return Estimate(setup, rows, notes=notes)


def _kv_cache_bytes(setup: Setup, arch: Architecture, batch: int, tokens: int) -> float:
    return 2 * arch.num_layers * arch.kv_dim * tokens * batch * setup.act_bytes


def _estimate_ppo(setup: Setup) -> Estimate:
    """One base copy with four adapters (ppo/roles.py), two of them trained, then the largest phase."""
    arch = setup.arch
    rows = _shard_weights(setup, weight_rows(setup, arch, "lm", "base (all four roles) "), arch)
    adapter = lora_params(setup, arch, "lm")
    frozen = 2 * adapter + arch.hidden_size + 1  # the reference's and reward model's adapters, the reward head
    rows.append(Row("frozen adapters (reference, reward model)", frozen * 4, f"{frozen / 1e6:.2f}M params, fp32"))
    rows += trainable_rows(setup, adapter, "policy")
    rows += trainable_rows(setup, adapter + arch.hidden_size + 1, "critic (+ value head)")
    ab = setup.act_bytes
    seq, response, prompt = setup.seq_len, setup.response_length, setup.seq_len - setup.response_length
    chunk = max(1, min(setup.forward_chunk or setup.rollout_batch, setup.rollout_batch))
    vocab = arch.vocab_size
    rollout_store = setup.rollout_batch * (2 * seq * 8 + 12 * response * 4)
    prefill = chunk * prompt * ab * (arch.q_dim + 2 * arch.kv_dim + 3 * arch.intermediate_size)
    generation = _kv_cache_bytes(setup, arch, chunk, seq) + prefill + chunk * vocab * 4
    logits = chunk * (response + 1) * vocab
    # one role's response logits at a time (fp32 when computed in bf16), entropy in 128-row chunks
    scoring = (logits * (ab + (4 if ab < 4 else 0)) + 2 * 128 * vocab * 4
               + chunk * seq * ab * (2 * arch.hidden_size + 3 * arch.intermediate_size))
    no_dropout = dataclasses.replace(setup, lora_dropout=0.0)  # PPO switches dropout off
    activations = activation_bytes(no_dropout, arch, setup.micro_batch, seq, True, 0.0)
    train_logits = setup.micro_batch * (response + 1) * vocab * (12 + ab)
    # the policy's backward frees its activations before the critic's forward: one role's at a time
    optimisation = activations + train_logits
    phases = {"generation": generation, "scoring": scoring, "optimisation": optimisation}
    phase = max(phases, key=phases.__getitem__)
    rows.append(Row("rollout buffers", rollout_store, f"{setup.rollout_batch} sequences"))
    details = {
        "generation": f"KV cache {chunk} × {seq} tokens + prefill",
        "scoring": f"no-grad forwards of {chunk} rows, response logits {chunk} × {response + 1} × {vocab}",
        "optimisation": f"policy {activations / GIB:.2f} GiB activations + logits {train_logits / GIB:.2f} GiB "
                        "(the critic's come after the policy's backward)",
    }
    rows.append(Row(f"peak phase: {phase}", phases[phase], details[phase]))
    rows += _runtime_rows(setup, phases[phase])
    return Estimate(setup, rows, phase=phase, phases=phases,
                    notes=[f"{name}: {value / GIB:.2f} GiB" for name, value in phases.items()])


# ------------------------------------------------------------------------------------------ verdict

@dataclass(frozen=True)
class Change:
    """A candidate change to the run and what it costs (speed, hardware or what is trained), for ranking."""

    text: str
    cost: float
    updates: dict[str, Any]


def _candidate_families(setup: Setup) -> list[list[Change]]:
    """Independent knobs; the search tries every combination of at most one change per knob."""
    families: list[list[Change]] = []
    if setup.stage in ("sft", "rm") and not setup.checkpointing:
        families.append([Change("turn on activation checkpointing (training.activation_checkpointing: true)",
                                1.0, {"checkpointing": True})])
    halvings = []
    for k in range(1, int(math.log2(setup.micro_batch)) + 1 if setup.micro_batch > 1 else 1):
        micro = max(1, setup.micro_batch // 2**k)
        accum = setup.grad_accum * setup.micro_batch // micro
        halvings.append(Change(f"micro-batch {micro} with gradient_accumulation_steps {accum} (same global batch)",
                               0.5 * k, {"micro_batch": micro, "grad_accum": accum}))
    if halvings:
        families.append(halvings)
    if setup.stage == "ppo" and setup.forward_chunk > 1:
        families.append([Change(f"local_rollout_forward_batch_size {setup.forward_chunk // 2**k}", 0.25 * k,
                                {"forward_chunk": setup.forward_chunk // 2**k})
                         for k in range(1, int(math.log2(setup.forward_chunk)) + 1)])
    if setup.device == "gpu":
        zero = []
        if setup.num_devices > 1 and setup.zero < 2:
            zero.append(Change("DeepSpeed ZeRO-2 (accelerate_configs/deepspeed_zero2.yaml)", 0.5, {"zero": 2}))
        if setup.zero < 3:
            zero.append(Change("DeepSpeed ZeRO-3 (accelerate_configs/deepspeed_zero3.yaml)", 1.5, {"zero": 3}))
        families.append(zero)
        families.append([Change("offload optimizer states to CPU RAM (ZeRO offload)", 3.0,
                                {"offload_optimizer": True, "zero": max(setup.zero, 2)}),
                         Change("offload optimizer states and parameters to CPU RAM (ZeRO-3 offload)", 5.0,
                                {"offload_optimizer": True, "offload_params": True, "zero": 3})])
        families.append([Change(f"{setup.num_devices * k} GPUs", 4.0 * math.log2(k),
                                {"num_devices": setup.num_devices * k}) for k in (2, 4, 8, 16)])
    if setup.lora_r is None:
        families.append([Change("LoRA instead of full fine-tuning (model.lora: {r: 16, target_modules: all-linear})",
                                3.0, {"lora_r": 16, "lora_targets": "all-linear"})])
    if setup.quantization is None:
        families.append([Change("4-bit NF4 base, QLoRA (model.quantization.load_in_4bit: true)", 2.0,
                                {"quantization": "4bit", "double_quant": True}),
                         Change("8-bit base (model.quantization.load_in_8bit: true)", 2.5, {"quantization": "8bit"})])
    return [family for family in families if family]


def _valid(setup: Setup) -> bool:
    if setup.quantization and setup.lora_r is None:
        return False
    if setup.zero and setup.device != "gpu":
        return False
    return not (setup.offload_params and setup.zero < 3)


def cheapest_fix(setup: Setup) -> tuple[list[Change], Estimate] | None:
    """The lowest-cost combination of changes whose estimate fits (ties: the lower peak), or None."""
    best: tuple[float, float, list[Change], Estimate] | None = None
    families = _candidate_families(setup)
    for choice in itertools.product(*[[None, *family] for family in families]):
        changes = [c for c in choice if c is not None]
        if not changes:
            continue
        cost = sum(c.cost for c in changes)
        if best is not None and cost > best[0]:
            continue
        updates: dict[str, Any] = {}
        for change in changes:
            for key, value in change.updates.items():
                updates[key] = max(updates.get(key, value), value) if key == "zero" else value
        candidate = dataclasses.replace(setup, **updates)
        if not _valid(candidate):
            continue
        result = estimate(candidate)
        if result.fits and (best is None or (cost, result.peak) < (best[0], best[1])):
            best = (cost, result.peak, changes, result)
    return (best[2], best[3]) if best else None


# ------------------------------------------------------------------------------------ from a recipe

def parse_memory(text: str) -> float:
    """'80GB', '24 GiB', '512MB' → bytes; GB means GiB, as GPU memory sizes are quoted."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    if not match or unit not in _UNITS:
        raise PipelineError(f"--gpu-memory: cannot read '{text}'; write e.g. 24GB, 80GB or 40GiB")
    return float(match.group(1)) * _UNITS[unit]


def _total_ram() -> float:
    try:
        text = Path("/proc/meminfo").read_text()
        return int(re.search(r"MemTotal:\s+(\d+)", text).group(1)) * 1024
    except (OSError, AttributeError):
        return 16 * GIB


def _accelerate_file(path: str) -> dict[str, Any]:
    """num_processes, ZeRO stage and offload from an accelerate config file."""
    import yaml

    data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    deepspeed = data.get("deepspeed_config") or {}
    found: dict[str, Any] = {"num_devices": int(data.get("num_processes") or 1)}
    if data.get("distributed_type") == "DEEPSPEED":
        found["zero"] = int(deepspeed.get("zero_stage", 0))
        found["offload_optimizer"] = deepspeed.get("offload_optimizer_device", "none") not in (None, "none")
        found["offload_params"] = deepspeed.get("offload_param_device", "none") not in (None, "none")
    return found


def setup_from_recipe(recipe: Recipe, device: str = "gpu", num_devices: int = 1, device_memory: float | None = None,
                      zero: int = 0, offload: str = "none", base: str | None = None) -> Setup:
    """The estimate's inputs from a validated recipe plus the hardware described on the command line."""
    spec, config = recipe.model, recipe.config
    name = base or spec.name_or_path
    model_config, where = find_config(name, spec.revision)
    arch = Architecture.from_config(model_config, where)
    dtype = spec.dtype if spec.dtype != "auto" else ("bfloat16" if device == "gpu" else "float32")
    explicit = config.get("activation_checkpointing", config.get("gradient_checkpointing"))
    quant = spec.quantization
    quantization = "4bit" if quant.load_in_4bit else ("8bit" if quant.load_in_8bit else None)
    if recipe.stage == "ppo":  # only QLoRA preparation turns it on for the policy
        checkpointing = bool(quantization) and device == "gpu"
    else:
        checkpointing = bool(explicit) if explicit is not None else device == "gpu"
    lora = spec.lora
    defaults = {"sft": 8, "rm": 8, "ppo": 4}
    micro = int(config.get("per_device_train_batch_size", defaults.get(recipe.stage, 8)))
    seq = recipe.data.max_length
    extra: dict[str, Any] = {}
    if recipe.stage == "ppo":
        response = int(config.get("response_length", 53))
        prompt = int(config.get("max_prompt_length") or recipe.data.max_length)
        accum, minis = int(config.get("gradient_accumulation_steps", 1)), int(config.get("num_mini_batches", 1))
        seq = prompt + response
        extra = {"response_length": response, "rollout_batch": micro * accum * minis,
                 "forward_chunk": int(config.get("local_rollout_forward_batch_size", 16))}
    elif recipe.stage in ("label", "eval"):
        micro = int(config.get("batch_size", 16))  # sequences per generate call (prompts × samples, in rows)
        seq += int(config.get("max_new_tokens", 48))
        lora = None  # sampling from finished stages: no new adapter
    return Setup(
        stage=recipe.stage, arch=arch, device=device, num_devices=num_devices,
        device_memory=device_memory or (_total_ram() if device == "cpu" else 80 * GIB), dtype=dtype,
        mixed_precision=device == "gpu" and (dtype != "float32" or bool(config.get("bf16") or config.get("fp16"))),
        quantization=quantization, double_quant=quant.bnb_4bit_use_double_quant,
        lora_r=lora.r if lora else None, lora_targets=lora.target_modules if lora else "all-linear",
        lora_layers=tuple(lora.layers_to_transform) if lora and lora.layers_to_transform else None,
        lora_dropout=lora.lora_dropout if lora else 0.0,
        modules_to_save=tuple(lora.modules_to_save or ()) if lora else (),
        micro_batch=micro, grad_accum=int(config.get("gradient_accumulation_steps", 1)), seq_len=seq,
        checkpointing=checkpointing, attn=spec.attn_implementation or "sdpa",
        packing=bool(config.get("packing") or config.get("padding_free")), zero=zero,
        offload_optimizer=offload in ("optimizer", "all"), offload_params=offload == "all", **extra,
    )


def load_for_estimate(recipe_path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Validate the recipe; data cards that an earlier stage has not written yet are not needed here."""
    from rlhf_pipeline.recipe import load_recipe

    return load_recipe(recipe_path, overrides or [], pending_outputs=[Path("/")])


def estimate_recipe(recipe_path: str | Path, overrides: list[str] | None = None, device: str = "gpu",
                    num_devices: int = 1, device_memory: float | None = None, zero: int = 0,
                    offload: str = "none", base: str | None = None) -> Estimate:
    """The estimate for a recipe file (what the command prints), for scripts and tests."""
    setup = setup_from_recipe(load_for_estimate(recipe_path, overrides), device, num_devices, device_memory,
                              zero, offload, base)
    return estimate(setup)


# ----------------------------------------------------------------------------------------- command

def _gib(value: float) -> str:
    return f"{value / GIB:8.2f}"


def render(result: Estimate, fix: tuple[list[Change], Estimate] | None) -> str:
    setup = result.setup
    params = setup.arch.total_params()
    size = f"{params / 1e9:.2f}B" if params >= 1e9 else f"{params / 1e6:.1f}M"
    lines = [f"model: {setup.arch.model_type}, {size} params "
             f"(config: {setup.arch.source})", setup.describe(), "",
             f"{'component':<48} {'GiB':>8}  how"]
    for row in result.rows:
        suffix = "  [host RAM]" if row.host else ""
        lines.append(f"{row.name:<48} {_gib(row.bytes)}  {row.detail}{suffix}")
    budget = setup.device_memory
    lines.append(f"{'peak per device':<48} {_gib(result.peak)}  of {budget / GIB:.0f} GiB"
                 + (f" (peak phase: {result.phase})" if setup.stage == "ppo" else ""))
    if result.host_bytes:
        lines.append(f"{'offloaded to CPU RAM':<48} {_gib(result.host_bytes)}")
    lines.append("")
    if result.fits:
        headroom = 1 - result.peak / budget
        lines.append(f"verdict: fits ({headroom:.0%} headroom)" + ("; tight, expect fragmentation to bite"
                                                                   if headroom < 0.1 else ""))
    elif fix is None:
        lines.append("verdict: does NOT fit, and no combination of the changes tried fits; use a smaller model, "
                     "shorter sequences or more memory")
    else:
        changes, fixed = fix
        lines.append(f"verdict: does NOT fit ({result.peak / GIB:.1f} GiB > {budget / GIB:.0f} GiB)")
        lines.append(f"cheapest change that fits: {' + '.join(c.text for c in changes)} "
                     f"→ {fixed.peak / GIB:.1f} GiB")
    return "\n".join(lines)


def _handler(args: argparse.Namespace) -> int:
    device = "cpu" if args.cpu else "gpu"
    num, zero = args.num_gpus, args.zero
    offload = args.offload
    if args.accelerate_config:
        found = _accelerate_file(args.accelerate_config)
        num = args.num_gpus if args.num_gpus_given else found["num_devices"]
        zero = zero if args.zero else found.get("zero", 0)
        if offload == "none" and found.get("offload_optimizer"):
            offload = "all" if found.get("offload_params") else "optimizer"
    memory = parse_memory(args.gpu_memory) if args.gpu_memory else None
    result = estimate_recipe(args.recipe, args.overrides, device, num if device == "gpu" else 1, memory, zero,
                             offload, args.base)
    fix = None if result.fits else cheapest_fix(result.setup)
    if args.json:
        out = result.as_dict()
        out["suggestion"] = ({"changes": [c.text for c in fix[0]], "peak_bytes": fix[1].peak,
                              "setup": fix[1].setup.describe()} if fix else None)
        print(json.dumps(out, indent=2))
    else:
        print(render(result, fix))
    return 0 if result.fits else 1


class _CountGiven(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, values)
        namespace.num_gpus_given = True


def add_commands(subparsers: Any) -> None:
    """`rlhf-pipeline estimate RECIPE [--num-gpus N] [--gpu-memory 80GB] [overrides...]`."""
    parser = subparsers.add_parser(
        "estimate", help="predict peak memory per device for a recipe, and whether it fits",
        description="Peak memory per device of a stage (weights, LoRA, gradients, optimizer, activations, "
                    "logits, KV cache; ZeRO and offload), from the model's config.json alone. Exit status 0 "
                    "when it fits, 1 when it does not (the cheapest change that fits is printed).",
        epilog="example: rlhf-pipeline estimate recipes/llama-3.1-8b-qlora/sft.yaml --gpu-memory 24GB",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("recipe", help="path to the stage's YAML recipe")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides, e.g. data.max_length=4096")
    parser.add_argument("--num-gpus", type=int, default=1, action=_CountGiven, help="processes/GPUs (default 1)")
    parser.add_argument("--gpu-memory", help="memory per device, e.g. 24GB, 80GB (GB = GiB); CPU: RAM size")
    parser.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=0, help="DeepSpeed ZeRO stage")
    parser.add_argument("--offload", choices=("none", "optimizer", "all"), default="none",
                        help="ZeRO CPU offload: optimizer states, or optimizer states and parameters")
    parser.add_argument("--accelerate-config", help="read processes, ZeRO stage and offload from this file")
    parser.add_argument("--cpu", action="store_true", help="estimate for this CPU (fp32) instead of GPUs")
    parser.add_argument("--base", help="model whose config.json to use when name_or_path does not exist yet")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(handler=_handler, num_gpus_given=False)
