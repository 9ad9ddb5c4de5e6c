"""The one pixel conversion: exact range, layout, and identical results on every path."""

from __future__ import annotations

import pytest
import torch

from maskvid.datamodules.pixels import to_model, to_uint8


def test_range_layout_and_round_trip():
    video = torch.randint(0, 256, (2, 5, 6, 7, 3), dtype=torch.uint8)
    video[0, 0, 0, 0] = torch.tensor([0, 128, 255], dtype=torch.uint8)
    x = to_model(video)
    assert x.shape == (2, 3, 5, 6, 7) and x.dtype == torch.float32 and x.is_contiguous()
    assert x[0, :, 0, 0, 0].tolist() == pytest.approx([-1.0, 128 / 127.5 - 1, 1.0], abs=1e-6)
    assert torch.equal(to_uint8(x), video)


def test_host_and_device_paths_agree_bit_for_bit():
    video = torch.randint(0, 256, (3, 4, 8, 8, 3), dtype=torch.uint8)
    host = to_model(video)  # the numpy path the loader uses
    device_path = to_model(video, out=torch.empty(3, 3, 4, 8, 8))  # the torch path (GPU, out=)
    assert torch.equal(host, device_path)


def test_rejects_float_input():
    with pytest.raises(TypeError, match="uint8"):
        to_model(torch.zeros(1, 2, 2, 3))
