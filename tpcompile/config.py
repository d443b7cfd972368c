"""The schema: dataclasses are the config, YAML in conf/ only picks options. Validated at the first line of
each entry point (OmegaConf.to_object runs the __post_init__ checks, which name the key and the numbers)."""
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("cpu", "cuda")


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


@dataclass
class RuleConfig:
    match: str = MISSING               # glob over parameter fqns
    style: str = MISSING               # colwise | rowwise | replicate


@dataclass
class PlanConfig:
    name: str = MISSING
    rules: list[RuleConfig] = field(default_factory=list)


@dataclass
class BackendConfig:
    name: str = "eager"                # eager | inductor


@dataclass
class RuntimeConfig:
    device: str = "cpu"                # cpu (gloo) | cuda (nccl, one GPU per rank)
    start_timeout_s: float = 120.0     # bound on starting workers, rendezvous and loading
    call_timeout_s: float = 600.0      # bound on one request to the workers

    def __post_init__(self):
        if self.device not in DEVICES:
            raise ConfigError(f"runtime.device={self.device!r}: use one of {list(DEVICES)}")
        for key in ("start_timeout_s", "call_timeout_s"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"runtime.{key}={getattr(self, key)}: must be > 0 seconds")


@dataclass
class JobConfig:
    model: ModelConfig = MISSING
    plan: PlanConfig = MISSING
    backend: BackendConfig = field(default_factory=BackendConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    tp: int = 2                        # tensor-parallel degree: number of ranks
    dtype: str = "float32"             # weights and activations
    out_dir: str = "outputs/engines"   # artifacts go to out_dir/<key>, relative to where tpcompile was started
    tolerance: Optional[float] = None  # verify: max relative error; default by dtype (fp32 1e-5, bf16 2e-2)
    input_seed: int = 1                # run/verify draw their inputs from this seed

    def __post_init__(self):
        if self.tp < 1:
            raise ConfigError(f"tp={self.tp}: the tensor-parallel degree must be >= 1")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype={self.dtype!r}: use one of {list(DTYPES)}")
        if self.runtime.device == "cuda":
            import torch
            have = torch.cuda.device_count()
            if self.tp > have:
                raise ConfigError(f"tp={self.tp} needs {self.tp} GPUs with runtime.device=cuda, found {have}; "
                                  f"lower tp or use runtime.device=cpu")


def register() -> None:
    from hydra.core.config_store import ConfigStore
    ConfigStore.instance().store(name="schema", node=JobConfig)
