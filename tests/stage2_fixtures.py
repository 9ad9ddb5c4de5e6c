"""Small stage-2 building blocks for tests: a tiny T5 text encoder directory and a stage-1
checkpoint file made from an untrained tokenizer (nothing downloaded, nothing trained)."""

from __future__ import annotations

from pathlib import Path

import torch

from maskvid.models.cvivit import CViViT
from maskvid.models.quantizer import VectorQuantizer
from maskvid.models.tokenizer_checkpoint import CHECKPOINT_KEY, FORMAT_VERSION


def tiny_t5_dir(out: Path, d_model: int = 32) -> Path:
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    torch.manual_seed(0)
    config = T5Config(vocab_size=384, d_model=d_model, d_kv=8, d_ff=64, num_layers=1, num_heads=4)
    T5EncoderModel(config).save_pretrained(out)
    ByT5Tokenizer().save_pretrained(out)
    return out


def tiny_tokenizer(codebook_size: int = 64, image_size: int = 32) -> CViViT:
    torch.manual_seed(0)
    return CViViT(image_size=image_size, patch_size=8, dim=32, spatial_depth=1, temporal_depth=1, heads=2,
                  quantizer=VectorQuantizer(codebook_size, 8))


def write_tokenizer_checkpoint(path: Path, tokenizer: CViViT) -> Path:
    """What TokenizerModule writes, minus the training state."""
    torch.save({CHECKPOINT_KEY: {"format": FORMAT_VERSION, "config": tokenizer.config, "prefix": "tokenizer."},
                "state_dict": {f"tokenizer.{k}": v for k, v in tokenizer.state_dict().items()}}, path)
    return path


BACKBONES = {
    "maskgit": {"class_path": "maskvid.models.maskgit.MaskGITBackbone",
                "init_args": {"vocab_size": 64, "grid": [5, 4, 4], "dim": 32, "depth": 2, "heads": 2, "text_dim": 32}},
    "mebt": {"class_path": "maskvid.models.mebt.MeBT",
             "init_args": {"vocab_size": 64, "grid": [5, 4, 4], "dim": 32, "depth": 1, "heads": 2, "num_latents": 8,
                           "text_dim": 32}},
}


def tiny_training_setup(root: Path) -> dict:
    """Synthetic 9-frame 32x32 shards, a tiny T5, an untrained tokenizer checkpoint, and model
    YAMLs for `maskvid fit`: maskgit, mebt (stage 2, on-the-fly tokens) and the GAN tokenizer."""
    import yaml

    from maskvid.datamodules.synthetic import build_synthetic
    from tests.test_tokenizer_module import MODEL as TOKENIZER_MODEL

    data = root / "data"
    build_synthetic(data, num_train=16, num_val=4, num_heldout=0, size=32, frames=9,
                    samples_per_shard=4, workers=1, progress=False)
    t5 = tiny_t5_dir(root / "t5")
    tok = write_tokenizer_checkpoint(root / "tok.ckpt", tiny_tokenizer())
    configs = {}
    for name, backbone in BACKBONES.items():
        configs[name] = root / f"{name}.yaml"
        configs[name].write_text(yaml.safe_dump({"model": {
            "class_path": "maskvid.lightning_modules.masked_video_module.MaskedVideoModule",
            "init_args": {"backbone": backbone, "tokenizer_path": str(tok), "text_encoder": str(t5),
                          "text_max_length": 8, "warmup_steps": 1, "num_val_videos": 0}}}))
    configs["tokenizer"] = root / "tokenizer.yaml"
    configs["tokenizer"].write_text(yaml.safe_dump(TOKENIZER_MODEL))
    return {"root": root, "data": data, "configs": configs}
