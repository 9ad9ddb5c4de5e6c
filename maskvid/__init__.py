"""maskvid: text-to-video on discrete video tokens (Phenaki's C-ViViT and MaskGIT, MeBT).

The repository's top-level folders are this package's subpackages: ``maskvid.models`` (pure torch
networks), ``maskvid.lightning_modules``, ``maskvid.datamodules``, ``maskvid.metrics``,
``maskvid.launch`` (the command line) and ``maskvid.configs`` (the YAML recipes).
"""

__version__ = "0.1.0"

# The Python API (maskvid/text_to_video.py, maskvid/video_tokenizer.py; docs/api.md), imported on
# first use so that `import maskvid` and the command line do not pay for torch and the models.
_API = {"TextToVideo": "maskvid.text_to_video", "VideoTokenizer": "maskvid.video_tokenizer",
        "PretrainedError": "maskvid.pretrained"}
__all__ = ["TextToVideo", "VideoTokenizer", "PretrainedError", "__version__"]


def __getattr__(name: str):
    if name in _API:
        import importlib

        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'maskvid' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
