"""The schema: dataclasses are the config, YAML in conf/ only picks options. Validated at the first line of
each entry point (OmegaConf.to_object runs the __post_init__ checks, which name the key and the numbers)."""
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING

from tpcompile.runtime import COLLECTIVES, DEVICES  # the values the workers accept

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key, the value and the fix."""


@dataclass
class InputSpec:
    name: str = MISSING
    shape: list[int] = MISSING
    dtype: str = "float32"             # int64 for token ids
    high: Optional[int] = None         # integer inputs are drawn from [0, high) and checked against it


@dataclass
class ModelConfig:
    name: str = MISSING                # preset name, shown in reports
    graph: Any = MISSING               # {_target_: graphs.llama.Llama, ...}: built on the meta device
    inputs: list[InputSpec] = MISSING  # example inputs: the engine's static input shapes
    seed: int = 0                      # random weights come from this seed (reset_parameters per module)
    path: Optional[str] = None         # model=hf: a Hugging Face checkpoint dir (config.json + safetensors)


@dataclass
class RuleConfig:
    match: str = MISSING               # glob over parameter fqns
    style: str = MISSING               # colwise | rowwise | replicate | vocab | auto
    parts: Optional[list[int]] = None  # a fused weight's part sizes along the cut dim (plan "auto" writes them)


@dataclass
class PlanConfig:
    name: str = MISSING
    rules: list[RuleConfig] = field(default_factory=list)


@dataclass
class BackendConfig:
    name: str = "eager"                # a file in conf/backend: eager, inductor, aoti, onnx, ... (*_cudagraphs)
    fuse_allreduce: bool = False       # all-reduce + residual add + RMSNorm as one op (passes/fuse_allreduce_norm.py)
                                       # on CUDA engines that can call it; off by default: its GPU kernel is unmeasured
    fuse_norm_residual: bool = False   # RMSNorm and residual add into the one-row products' kernel
                                       # (passes/one_row_linear.py); off by default until its GPU tests pass
    fuse_rope: bool = False            # RoPE of q into the decode-attention kernel, of k into one kernel with
                                       # both cache writes (passes/rope_into_attention.py, fuse_cache_write.py);
                                       # off by default until measured on a GPU
    skip_passes: list[str] = field(default_factory=list)  # optional passes to leave out, e.g. [decode_attention]
                                       # (tpcompile.passes.OPTIONAL): to measure each one's effect

    def __post_init__(self):
        from tpcompile.lower import BACKENDS  # the registry is the list of names
        from tpcompile.passes import OPTIONAL
        if self.name not in BACKENDS:
            raise ConfigError(f"backend.name={self.name!r} is not known; use one of {sorted(BACKENDS)}")
        unknown = [p for p in self.skip_passes if p not in OPTIONAL]
        if unknown:
            raise ConfigError(f"backend.skip_passes={list(self.skip_passes)}: {unknown[0]!r} is not an optional pass; "
                              f"use any of {list(OPTIONAL)}")

    def passes(self, device: str) -> frozenset:
        """The optional passes a build of this backend on `device` runs."""
        from tpcompile.passes import optional_passes
        asked = {"fuse_allreduce_norm": self.fuse_allreduce, "fuse_norm_residual": self.fuse_norm_residual,
                 "rope_into_attention": self.fuse_rope, "fuse_cache_write": self.fuse_rope}
        return optional_passes(self.name, device, self.skip_passes, [name for name, on in asked.items() if on])


@dataclass
class RuntimeConfig:
    device: str = "cpu"                # cpu (gloo) | cuda (nccl, one GPU per rank)
    start_timeout_s: float = 120.0     # bound on starting workers, rendezvous and loading
    call_timeout_s: float = 600.0      # bound on one request to the workers
    heartbeat_timeout_s: float = 10.0  # a ready rank silent this long (stopped, frozen holding the GIL) fails the run
    max_restarts: int = 0              # after a rank dies or hangs: restart the group, retry the request once
    collectives: str = "auto"          # auto (gloo on cpu, nccl on cuda) | gloo | nccl; gloo on cuda lets several
                                       # ranks share one GPU (a correctness check, not a speed figure)

    def __post_init__(self):
        if self.device not in DEVICES:
            raise ConfigError(f"runtime.device={self.device!r}: use one of {list(DEVICES)}")
        for key in ("start_timeout_s", "call_timeout_s", "heartbeat_timeout_s"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"runtime.{key}={getattr(self, key)}: must be > 0 seconds")
        if self.collectives not in COLLECTIVES:
            raise ConfigError(f"runtime.collectives={self.collectives!r}: use one of {list(COLLECTIVES)}")
        if self.collectives == "nccl" and self.device != "cuda":
            raise ConfigError(f"runtime.collectives=nccl needs runtime.device=cuda (got {self.device!r}); "
                              f"use collectives=gloo or auto on cpu")
        if self.max_restarts < 0:
            raise ConfigError(f"runtime.max_restarts={self.max_restarts}: must be >= 0 (0 = fail on the first error)")


@dataclass
class BenchConfig:
    prompt_len: int = 32               # tokens per prompt (every row of the batch)
    new_tokens: int = 64               # decode steps timed = new_tokens - 1
    profile_steps: int = 8             # extra decode steps under torch.profiler for the collective share
    results_dir: Optional[str] = None  # also write the record here (e.g. benchmarks/results)

    def __post_init__(self):
        if self.new_tokens < 2:
            raise ConfigError(f"bench.new_tokens={self.new_tokens}: the first token comes from prefill, so a "
                              f"decode step needs at least 2; use bench.new_tokens=64")


@dataclass
class GenerationConfig:
    """tpcompile generate / bench (and compile kv_cache=true): the KV cache sizes are compiled in."""
    max_seq: int = 128                 # cache length per row: padded prompt + new tokens must fit
    max_batch: int = 4                 # rows of the cache: prompts generated together
    prefill_chunk: int = 16            # prompts are prefilled in chunks of this many tokens (one static graph)
    prompt: str = "Once upon a time"   # generate: the prompt (byte-level tokens for random-weight presets)
    max_new_tokens: int = 32           # generate: tokens to produce after the prompt
    temperature: float = 0.0           # 0: greedy
    top_k: int = 0                     # 0: off
    top_p: float = 1.0                 # 1.0: off
    seed: int = 0                      # sampling seed
    eos_token_id: Optional[int] = None # stop a row at this token (default: the checkpoint's generation_config)
    chat: bool = False                 # generate: the prompt as a user message through the tokenizer's chat template
    stop: list[str] = field(default_factory=list)  # generate: stop strings (the text ends before the first)

    def __post_init__(self):
        for key in ("max_seq", "max_batch", "prefill_chunk"):
            if getattr(self, key) < 1:
                raise ConfigError(f"generation.{key}={getattr(self, key)}: must be >= 1")
        if self.max_seq % self.prefill_chunk:
            raise ConfigError(f"generation.max_seq={self.max_seq} is not a multiple of generation.prefill_chunk="
                              f"{self.prefill_chunk}; choose generation.max_seq="
                              f"{self.max_seq // self.prefill_chunk * self.prefill_chunk + self.prefill_chunk}")
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ConfigError(f"generation.temperature={self.temperature}, top_k={self.top_k}, top_p={self.top_p}: "
                              f"need temperature >= 0, top_k >= 0, 0 < top_p <= 1")


@dataclass
class VerifyConfig:
    """tpcompile verify: the sharded run against the unsharded model."""
    tolerance: Optional[float] = None  # max relative error; default by dtype (fp32 1e-5, bf16 2e-2)
    per_layer: bool = False            # also compare every block's output, name the first that diverges


@dataclass
class InspectConfig:
    """tpcompile inspect: a picture of one layer of the partitioned graph (SVG with Graphviz's dot; DOT + text)."""
    render: bool = False               # write layer<render_layer>.{dot,svg,txt} into the run dir
    render_layer: int = 0              # which layer: the index under the first numbered module container


@dataclass
class ServerConfig:
    """tpcompile serve: an OpenAI-compatible HTTP server over the generation artifact (tpcompile/serve/)."""
    host: str = "127.0.0.1"            # loopback; 0.0.0.0 serves other machines too
    port: int = 8000
    model_name: Optional[str] = None   # the model name clients send (default: model.name)
    max_queue: int = 64                # requests waiting for a row beyond this are refused (429)
    max_tokens: int = 256              # a request's default max_tokens (clipped to what fits in max_seq)
    drain_s: float = 30.0              # on SIGTERM: streams in flight finish within this, then are cut
    step_timeout_s: float = 60.0       # bound on one scheduler step on the workers (after the warm-up)
    decode_steps: int = 4              # decode steps per worker call while no request waits to join (fewer round
                                       # trips per token; a new request waits at most this many steps)

    def __post_init__(self):
        if not 0 <= self.port < 65536:
            raise ConfigError(f"server.port={self.port}: use a port in [0, 65535]")
        for key in ("max_queue", "max_tokens", "decode_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"server.{key}={getattr(self, key)}: must be >= 1")
        for key in ("drain_s", "step_timeout_s"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"server.{key}={getattr(self, key)}: must be > 0 seconds")


@dataclass
class JobConfig:
    model: ModelConfig = MISSING
    plan: PlanConfig = MISSING
    backend: BackendConfig = field(default_factory=BackendConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    inspect: InspectConfig = field(default_factory=InspectConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    tp: int = 2                        # tensor-parallel degree: number of ranks
    dtype: str = "float32"             # weights and activations
    out_dir: str = "outputs/engines"   # artifacts go to out_dir/<key>, relative to where tpcompile was started
    input_seed: int = 1                # run/verify draw their inputs from this seed
    kv_cache: bool = False             # compile: build the prefill + decode artifact that generate and bench use
    artifact: Optional[str] = None     # run / generate / bench / serve: this compiled artifact as it is (no capture)

    def __post_init__(self):
        if self.tp < 1:
            raise ConfigError(f"tp={self.tp}: the tensor-parallel degree must be >= 1")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype={self.dtype!r}: use one of {list(DTYPES)}")
        if self.runtime.device == "cuda":
            import torch
            have = torch.cuda.device_count()
            if have == 0 or (self.tp > have and self.runtime.collectives != "gloo"):
                raise ConfigError(f"tp={self.tp} needs {self.tp} GPUs with runtime.device=cuda, found {have}; "
                                  f"lower tp, use runtime.device=cpu, or runtime.collectives=gloo to share GPUs")


# keys that moved into a group: the CLI names the new key when an old one is given
MOVED = {**{k: f"generation.{k}" for k in GenerationConfig.__dataclass_fields__},
         "tolerance": "verify.tolerance", "per_layer": "verify.per_layer",
         "render": "inspect.render", "render_layer": "inspect.render_layer"}


def register() -> None:
    from hydra.core.config_store import ConfigStore
    ConfigStore.instance().store(name="schema", node=JobConfig)
