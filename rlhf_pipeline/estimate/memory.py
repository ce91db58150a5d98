"""The memory model: what one device holds for a stage, row by row, from a `Setup` (no torch).

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
  prefill; under ZeRO-3 also the rest of the base, gathered whole for generate()), scoring (no-grad
  forwards of one role at a time; one role's response logits), optimisation (one role's activations of a
  micro-batch, since the policy's backward runs before the critic's forward, plus the response logits).
- runtime: CUDA context and allocator slack on GPUs (0.8 GiB); on CPU the libraries (~0.5 GiB) and an
  allowance of 0.5 × (activations + loss temporaries) for the freed temporaries glibc's heap keeps
  resident (0 to 1.8 GiB measured on SmolLM2; none with MALLOC_MMAP_THRESHOLD_=65536).

Checked on this CPU (benchmarks/memory_probe.py, MALLOC_MMAP_THRESHOLD_=65536 so RSS follows the live
tensors): SmolLM2-135M SFT steps at 8×128, 4×128, 2×512 tokens, with and without LoRA dropout and with
activation checkpointing, all within 5% of the prediction; the tiny test Llama within 12%.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from rlhf_pipeline.estimate.architecture import Architecture, targeted_linears
from rlhf_pipeline.stages import MemoryModel, get_stage

GIB = 2**30
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_NF4_BLOCK = 64  # bitsandbytes' 4-bit block size: one absmax per 64 weights
_DQ_BLOCK = 256  # double quantization: absmaxes quantized to 8 bits in blocks of 256, one fp32 each
_FUSED_TOKENS, _FUSED_VOCAB = 4096, 32768  # TRL's chunked log-prob head tile
_CPU_FUSED_TILES = 8.25  # fp32 tile-sized temporaries of its torch fallback during backward (measured)
_CPU_HEAP_RETENTION = 0.5  # glibc keeps freed temporaries resident: an allowance, see _runtime_rows
_CPU_LIBRARIES = 0.5 * GIB  # torch + transformers + TRL + PEFT + datasets + deepspeed, resident
_GPU_RUNTIME = 0.8 * GIB  # CUDA context, cuBLAS workspace, caching-allocator slack


# ---------------------------------------------------------------------------------------------- setup

@dataclass(frozen=True)
class Setup:
    """Everything the estimate depends on: the model, the stage's shapes, the hardware and the parallelism."""

    stage: str
    arch: Architecture
    memory: MemoryModel | None = None  # how the stage uses memory; None: its registered stage's MemoryModel
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
    def kind(self) -> str:
        """train, ppo or sample (stages.MemoryModel)."""
        return self.memory_model.kind

    @property
    def memory_model(self) -> MemoryModel:
        return self.memory or get_stage(self.stage).memory

    @property
    def act_bytes(self) -> int:
        """Bytes per activation value: the loaded dtype, or 2 under bf16/fp16 autocast on GPUs."""
        return 2 if self.device == "gpu" and self.mixed_precision else _DTYPE_BYTES[self.dtype]

    @property
    def weight_bytes(self) -> int:
        return _DTYPE_BYTES[self.dtype]

    def describe(self) -> str:
        method = "sampling" if self.kind == "sample" else "full fine-tuning" if self.lora_r is None else (
            f"{'QLoRA ' + self.quantization if self.quantization else 'LoRA'} r={self.lora_r}")
        zero = f", ZeRO-{self.zero}" if self.zero else ""
        offload = ", optimizer offload" if self.offload_optimizer else ""
        offload += ", parameter offload" if self.offload_params else ""
        hardware = (f"{self.num_devices} × {'GPU' if self.device == 'gpu' else 'CPU'} "
                    f"{self.device_memory / GIB:.0f} GiB")
        shape = f"micro-batch {self.micro_batch} × {self.seq_len} tokens"
        if self.kind == "ppo":
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
    model = setup.memory_model
    if model.kind == "ppo":
        return _estimate_ppo(setup)
    arch = setup.arch
    head = model.head
    training = model.kind == "train"
    rows = _shard_weights(setup, weight_rows(setup, arch, head, "", training), arch)
    notes: list[str] = []
    if not training:  # sampling only, no gradients: one base, the models compared are adapters on it
        kv = _kv_cache_bytes(setup, arch, setup.micro_batch, setup.seq_len)
        rows.append(Row("KV cache (generation)", kv, f"batch {setup.micro_batch} × {setup.seq_len} tokens"))
        rows.append(Row("next-token logits", setup.micro_batch * arch.vocab_size * 4 * 2, "fp32, with a softmax"))
        rows += _runtime_rows(setup, 0)
        return Estimate(setup, rows, phase="generation", notes=notes)
    modules = setup.modules_to_save or (("score",) if head == "score" and setup.lora_r is not None else ())
    setup_head = dataclasses.replace(setup, modules_to_save=modules)
    rows += trainable_rows(setup, lora_params(setup_head, arch, head), "")
    batch = setup.micro_batch * model.rows_per_example
    activations = activation_bytes(setup, arch, batch, setup.seq_len, setup.lora_r is not None, setup.lora_dropout)
    rows.append(Row("activations", activations, f"{batch} × {setup.seq_len} tokens"
                    + (", checkpointed" if setup.checkpointing else "")))
    if model.fused_loss:
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
    base = weight_rows(setup, arch, "lm", "base (all four roles) ")
    rows = _shard_weights(setup, base, arch)
    # ZeRO-3: generate() runs on the whole base, gathered once per rollout (ppo/sharding.py)
    gathered = sum(r.bytes for r in base) - sum(r.bytes for r in rows[:len(base)] if not r.host)
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
    generation = _kv_cache_bytes(setup, arch, chunk, seq) + prefill + chunk * vocab * 4 + gathered
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
        "generation": f"KV cache {chunk} × {seq} tokens + prefill"
                      + (f" + the whole base gathered ({gathered / GIB:.2f} GiB)" if gathered else ""),
        "scoring": f"no-grad forwards of {chunk} rows, response logits {chunk} × {response + 1} × {vocab}",
        "optimisation": f"policy {activations / GIB:.2f} GiB activations + logits {train_logits / GIB:.2f} GiB "
                        "(the critic's come after the policy's backward)",
    }
    rows.append(Row(f"peak phase: {phase}", phases[phase], details[phase]))
    rows += _runtime_rows(setup, phases[phase])
    return Estimate(setup, rows, phase=phase, phases=phases,
                    notes=[f"{name}: {value / GIB:.2f} GiB" for name, value in phases.items()])
