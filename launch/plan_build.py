"""`maskvid plan`, part 1: the config instantiated as `maskvid fit` would, without weights.

Model, data and trainer come from `MaskvidCLI(run=False)` on the meta device. The frozen stage-2
parts that would be loaded are built from configs instead: the stage-1 tokenizer from the recipe
that writes its checkpoint (or a configs/ C-ViViT of the same vocabulary), a hub T5 from its
known dimensions. Nothing is downloaded or read beyond configs and a checkpoint's recorded config.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence
from unittest import mock

import torch
from torch import nn

from maskvid.configs import CONFIG_DIR
from maskvid.launch.config_includes import merged_config


# Hub text encoders the base recipes name, as T5Config fields: built, never downloaded.
T5_CONFIGS: dict[str, dict[str, Any]] = {
    "t5-v1_1-small": dict(d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_heads=6, feed_forward_proj="gated-gelu"),
    "t5-v1_1-base": dict(d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_heads=12, feed_forward_proj="gated-gelu"),
    "t5-v1_1-large": dict(d_model=1024, d_kv=64, d_ff=2816, num_layers=24, num_heads=16, feed_forward_proj="gated-gelu"),
    "t5-v1_1-xl": dict(d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_heads=32, feed_forward_proj="gated-gelu"),
    "t5-v1_1-xxl": dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu"),
    "t5-small": dict(d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8),
    "t5-base": dict(d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12),
    "t5-large": dict(d_model=1024, d_kv=64, d_ff=4096, num_layers=24, num_heads=16),
    "t5-3b": dict(d_model=1024, d_kv=128, d_ff=16384, num_layers=24, num_heads=32),
    "t5-11b": dict(d_model=1024, d_kv=128, d_ff=65536, num_layers=24, num_heads=128),
}


class PlanError(ValueError):
    """The config cannot be planned (one line for the user)."""


# -- building the module from the config ---------------------------------------------------------


class _PlanTextEncoder(nn.Module):
    """Stand-in for maskvid.models.text_encoder.TextEncoder with the named model's architecture and random
    weights: a hub T5 from T5_CONFIGS, anything local from its config file."""

    def __init__(self, name_or_path: str = "packaged:minilm", max_length: int = 32, dtype: str = "fp32") -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel, ByT5Tokenizer, T5Config, T5EncoderModel

        from maskvid.models.text_encoder import resolve_text_encoder

        self.max_length = max_length
        key = name_or_path.rsplit("/", 1)[-1]
        source = resolve_text_encoder(name_or_path)
        if key in T5_CONFIGS and not Path(source).is_dir():
            hf_config = T5Config(vocab_size=32128, **T5_CONFIGS[key])
        elif Path(source).is_dir():
            hf_config = AutoConfig.from_pretrained(source, local_files_only=True)
        else:
            raise PlanError(f"text encoder {name_or_path!r}: not a local directory and not a known T5 "
                            f"({', '.join(sorted(T5_CONFIGS))})")
        is_t5 = hf_config.model_type in ("t5", "mt5", "umt5")
        self.model = T5EncoderModel(hf_config) if is_t5 else AutoModel.from_config(hf_config)
        self.model.requires_grad_(False).eval().to({"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
        self.vocab = int(hf_config.vocab_size)
        self.dim = int(getattr(hf_config, "d_model", None) or hf_config.hidden_size)
        self.tokenizer = ByT5Tokenizer()  # shapes only: captions are padded to max_length

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def train(self, mode: bool = True) -> "_PlanTextEncoder":
        return super().train(False)

    @torch.no_grad()
    def forward(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.randint(0, min(self.vocab, 384), (len(captions), self.max_length), device=self.device)
        mask = torch.ones_like(ids)
        out = self.model(input_ids=ids, attention_mask=mask)
        return out.last_hidden_state.float(), mask.bool()


def _tokenizer_from_config(path: str, vocab_size: int | None = None):
    """The stage-1 tokenizer a checkpoint or exported directory describes (its recorded config,
    weights not read), or the configs/ C-ViViT with `vocab_size` codes when the checkpoint does
    not exist yet."""
    from maskvid.models.config import instantiate
    from maskvid.models.tokenizer_checkpoint import CHECKPOINT_KEY

    if (Path(path) / "config.json").is_file():  # an exported directory (maskvid/pretrained.py)
        from maskvid.pretrained import TEXT_TO_VIDEO, VIDEO_TOKENIZER, read_config

        return instantiate(read_config(path, (VIDEO_TOKENIZER, TEXT_TO_VIDEO))["tokenizer"]).eval().requires_grad_(False)
    if Path(path).is_file():
        with torch._subclasses.fake_tensor.unset_fake_temporarily():
            info = torch.load(path, map_location="cpu", weights_only=True, mmap=True)[CHECKPOINT_KEY]
        return instantiate(info["config"]).eval().requires_grad_(False)
    candidates = sorted((CONFIG_DIR / "experiment").glob("tokenizer_*.yaml")) + sorted((CONFIG_DIR / "model").glob("cvivit_*.yaml"))
    docs = [merged_config(cfg) for cfg in candidates]
    # The stage-1 recipe that writes this checkpoint (its default_root_dir holds the path) first.
    writes = [str(path).startswith(str((d.get("trainer") or {}).get("default_root_dir") or "//")) for d in docs]
    for _, doc in sorted(zip(writes, docs), key=lambda pair: not pair[0]):
        spec = ((doc.get("model") or {}).get("init_args") or {}).get("tokenizer")
        if not isinstance(spec, dict) or "class_path" not in spec:
            continue  # a partial override of another file's tokenizer
        tokenizer = instantiate(spec)
        if vocab_size is None or tokenizer.vocab_size == vocab_size:
            return tokenizer.eval().requires_grad_(False)
    raise PlanError(f"tokenizer_path {path} does not exist and no configs/ C-ViViT has {vocab_size} codes")


@contextlib.contextmanager
def _stand_ins() -> Iterator[None]:
    """Frozen stage-2 parts built from configs instead of loaded (nothing to download or read)."""
    import maskvid.lightning_modules.masked_video_module as mvm

    pending: dict[str, int] = {}
    real_init = mvm.MaskedVideoModule.__init__

    @functools.wraps(real_init)  # jsonargparse reads the signature through __wrapped__
    def init(self, backbone, *args, **kwargs):
        pending["vocab"] = getattr(backbone, "vocab_size", None)
        real_init(self, backbone, *args, **kwargs)

    with mock.patch.object(mvm.MaskedVideoModule, "__init__", init), \
            mock.patch.object(mvm, "load_tokenizer", lambda path, *a, **k: _tokenizer_from_config(path, pending.get("vocab"))), \
            mock.patch.object(mvm, "TextEncoder", _PlanTextEncoder):
        yield


@dataclass
class Recipe:
    """What the config asks for: the module, the per-process batch and the strategy."""

    module: Any
    stage: int
    batch_size: int
    num_frames: int
    resolution: int
    samples: str
    text_length: int
    strategy: str
    activation_checkpointing: bool
    param_dtype: str  # compute dtype of trainable parameters under FSDP ("bf16"/"fp32"); else the precision's
    precision: str
    devices: Any
    num_nodes: int
    max_steps: int
    configs: list[str] = field(default_factory=list)


def _strategy_kind(strategy: Any) -> tuple[str, bool, str]:
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, ModelParallelStrategy

    if isinstance(strategy, ModelParallelStrategy):
        return "fsdp", bool(getattr(strategy, "activation_checkpointing", False)), getattr(strategy, "param_dtype", "bf16")
    if isinstance(strategy, DeepSpeedStrategy):
        stage = int(strategy.config.get("zero_optimization", {}).get("stage", 2))
        return f"deepspeed_zero{stage}", False, "fp32"
    if isinstance(strategy, DDPStrategy):
        return "ddp", False, "fp32"
    return "single", False, "fp32"


def load_recipe(configs: Sequence[str], overrides: Sequence[str] = (), fake: bool = True) -> Recipe:
    """Instantiate the config as `maskvid fit` would (model, data, trainer), with fake weights."""
    from maskvid.launch.lightning_cli import MaskvidCLI
    from maskvid.lightning_modules.masked_video_module import MaskedVideoModule
    from maskvid.lightning_modules.tokenizer_module import TokenizerModule

    args: list[str] = []
    for c in configs:
        args += ["--config", str(c)]
    # Instantiated on this machine's CPU whatever the recipe's accelerator; the plan supplies the GPUs.
    args += ["--trainer.accelerator", "cpu", "--trainer.devices", "1", *overrides]
    # Built on the meta device (no memory, no initialisation); trace_step turns the weights into
    # fake tensors. (Constructing under FakeTensorMode itself trips torchmetrics' states.)
    mode = torch.device("meta") if fake else contextlib.nullcontext()
    with _stand_ins(), mode, mock.patch("sys.argv", ["maskvid"]):
        cli = MaskvidCLI(args=args, run=False)
    module, data, trainer = cli.model, cli.datamodule, cli.trainer
    if isinstance(module, TokenizerModule):
        stage = 1
    elif isinstance(module, MaskedVideoModule):
        stage = 2
    else:
        raise PlanError(f"{type(module).__name__}: the planner knows TokenizerModule and MaskedVideoModule")
    hp = dict(getattr(data, "hparams", {}))
    if stage == 2 and hp.get("samples") == "tokens" and getattr(module.tokenizer, "image_size", None):
        # Token shards hold the grid the tokenizer made at its own frame size.
        hp["resolution"] = int(module.tokenizer.image_size)
    kind, ac, param_dtype = _strategy_kind(trainer.strategy)
    precision = str(trainer.precision)
    if kind != "fsdp":
        param_dtype = "bf16" if precision.startswith("bf16") else "fp32"
    cfg = cli.config
    return Recipe(
        module=module, stage=stage, batch_size=int(hp.get("batch_size", 1)), num_frames=int(hp.get("num_frames", 17)),
        resolution=int(hp.get("resolution", 64)), samples=str(hp.get("samples", "video")),
        text_length=int(getattr(module.hparams, "text_max_length", 0) or 0), strategy=kind,
        activation_checkpointing=ac, param_dtype=param_dtype, precision=precision,
        devices=cfg.get("trainer", {}).get("devices"), num_nodes=int(trainer.num_nodes or 1),
        max_steps=int(trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else 1000),
        configs=[str(c) for c in configs],
    )


