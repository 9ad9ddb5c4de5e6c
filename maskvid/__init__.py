"""maskvid: text-to-video on discrete video tokens (Phenaki's C-ViViT and MaskGIT, MeBT).

The repository's top-level folders are this package's subpackages: ``maskvid.models`` (pure torch
networks), ``maskvid.lightning_modules``, ``maskvid.datamodules``, ``maskvid.metrics``,
``maskvid.launch`` (the command line) and ``maskvid.configs`` (the YAML recipes).
"""

__version__ = "0.1.0"
