"""The YAML recipes, shipped with the package: ``CONFIG_DIR / "experiment/mebt_demo.yaml"``."""

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent
