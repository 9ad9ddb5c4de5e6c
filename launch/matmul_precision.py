"""TF32 for fp32 matmuls and convolutions, as a callback: Lightning has no trainer flag for it, and
a callback in configs/trainer/gpu.yaml (or a recipe) keeps the choice in the YAML with the rest."""

from __future__ import annotations

from typing import Literal, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer


class MatmulPrecision(Callback):
    """Sets torch's float32 matmul precision and cuDNN's TF32 switch, and puts back the previous
    values when the run ends (so a test or a notebook is left as it was). Applied when the callback
    is built and again at setup: Lightning checks the matmul precision when it sets the GPU up,
    before any callback hook runs, and would otherwise advise setting it."""

    def __init__(self, precision: Literal["highest", "high", "medium"] = "high") -> None:
        """
        Args:
            precision: torch.set_float32_matmul_precision: "high" lets fp32 matmuls use TF32 tensor
                cores (and cuDNN convolutions TF32 too); "highest" keeps full fp32; "medium" allows
                bf16 internally. Parts already under bf16 autocast are unaffected.
        """
        super().__init__()
        if precision not in ("highest", "high", "medium"):
            raise ValueError(f"precision must be highest, high or medium, got {precision!r}")
        self.precision = precision
        self._saved: Optional[tuple[str, bool]] = None
        self.apply()

    def apply(self) -> None:
        if self._saved is None:
            self._saved = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
        torch.set_float32_matmul_precision(self.precision)
        torch.backends.cudnn.allow_tf32 = self.precision != "highest"

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.apply()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._saved is not None:
            matmul, cudnn = self._saved
            torch.set_float32_matmul_precision(matmul)
            torch.backends.cudnn.allow_tf32 = cudnn
            self._saved = None
