"""bf16: attention stays fp32 under CPU autocast (its bf16 CPU backward kernel is slow;
models/attention.py's non-CUDA path), LocalMixing's depthwise conv runs in its weights' dtype
under autocast (every device), and one helper decides where the demo and `generate` use bf16."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import maskvid.precision as precision
from maskvid.models.attention import CrossAttention, SelfAttention
from maskvid.models.layers import LocalMixing


def spy_sdpa(monkeypatch) -> list[torch.dtype]:
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append(q.dtype)
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return seen


def test_attention_runs_in_fp32_under_cpu_autocast_and_hands_back_bf16(monkeypatch):
    seen = spy_sdpa(monkeypatch)
    torch.manual_seed(0)
    attn, cross = SelfAttention(32, 4), CrossAttention(32, 4)
    x, ctx = torch.randn(2, 10, 32, requires_grad=True), torch.randn(2, 6, 32)
    mask = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    reference = attn(x) + cross(x, ctx, mask)
    assert seen == [torch.float32, torch.float32]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(x) + cross(x, ctx, mask)
    # The projections ran in bf16 (their output is bf16), the attention itself in fp32.
    assert out.dtype == torch.bfloat16
    assert seen[2:] == [torch.float32, torch.float32]
    torch.testing.assert_close(out.float(), reference, atol=0.05, rtol=0.05)
    out.float().sum().backward()
    # The gradient is the fp32 one, to bf16 precision.
    mixed, x.grad = x.grad, None
    reference.sum().backward()
    torch.testing.assert_close(mixed, x.grad, atol=0.05, rtol=0.05)


def test_attention_keeps_fp32_inputs_and_bf16_without_autocast_as_they_are(monkeypatch):
    seen = spy_sdpa(monkeypatch)
    attn = SelfAttention(32, 4).to(torch.bfloat16)
    out = attn(torch.randn(1, 4, 32, dtype=torch.bfloat16))
    # A bf16 model run outside autocast is the caller's choice: the result keeps its dtype.
    assert out.dtype == torch.bfloat16 and seen == [torch.float32]


def test_local_mixing_convolves_in_its_weights_dtype_under_autocast():
    mixing = LocalMixing(16)
    torch.nn.init.normal_(mixing.conv.weight)
    dtypes = []
    mixing.conv.register_forward_hook(lambda module, args, out: dtypes.append((args[0].dtype, out.dtype)))
    x = torch.randn(2, 2 * 3 * 3, 16)
    reference = mixing(x, (2, 3, 3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mixing(x, (2, 3, 3))
    assert dtypes == [(torch.float32, torch.float32)] * 2
    torch.testing.assert_close(out, reference)
    # A bf16 model (FSDP2's bf16 parameters) convolves in bf16.
    out = mixing.to(torch.bfloat16)(x.bfloat16(), (2, 3, 3))
    assert dtypes[-1] == (torch.bfloat16, torch.bfloat16) and out.dtype == torch.bfloat16


def test_precision_choice(monkeypatch):
    assert precision.resolve("32", "cpu") is False
    assert precision.resolve("bf16", "cpu") is True
    with pytest.raises(ValueError, match="auto, bf16 or 32"):
        precision.resolve("fp8", "cpu")
    for native, expected in ((True, "bf16-mixed"), (False, "32-true")):
        monkeypatch.setattr(precision, "native_bf16", lambda device_type, native=native: native)
        assert precision.trainer_precision("cpu") == expected
        assert precision.resolve("auto", "cpu") is native
    monkeypatch.undo()
    assert precision.native_bf16("cuda") == (torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    assert precision.native_bf16("meta") is False
    # CPUs: AMX or AVX512-BF16 count; without either (emulated bf16) the fits stay fp32.
    for amx, avx512_bf16 in ((False, False), (True, False), (False, True)):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        assert precision.native_bf16("cpu") is (amx or avx512_bf16)


def test_matmul_precision_callback_sets_tf32_for_the_run_and_restores_it(tmp_path):
    """configs/trainer/gpu.yaml's TF32 switch: on while the trainer runs (checked from inside a
    real fit), the previous values back afterwards."""
    from lightning.pytorch import Callback, Trainer

    from maskvid.launch.matmul_precision import MatmulPrecision
    from tests.tiny_model import TinyVideoModel

    before = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    seen = []

    class Probe(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append((torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32))

    try:
        callback = MatmulPrecision("high")
        # Already on when built: Lightning checks the precision when it sets up a GPU, before any hook.
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32
        model = TinyVideoModel()
        batches = [{"video": torch.randn(1, 3, 2, 8, 8)} for _ in range(2)]
        trainer = Trainer(accelerator="cpu", max_steps=2, callbacks=[callback, Probe()], logger=False,
                          enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                          default_root_dir=tmp_path)
        trainer.fit(model, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
        assert seen == [("high", True)] * 2
        assert torch.get_float32_matmul_precision() == "highest" and torch.backends.cudnn.allow_tf32 is False
        MatmulPrecision("highest")
        assert torch.get_float32_matmul_precision() == "highest" and torch.backends.cudnn.allow_tf32 is False
        with pytest.raises(ValueError, match="highest, high or medium"):
            MatmulPrecision("tf32")
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.allow_tf32 = before[1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_a_gpu_fp32_matmuls_run_in_tf32_during_the_fit(tmp_path):
    """What configs/trainer/gpu.yaml asks for, on the real device: TF32 matmuls and convolutions
    while training under bf16-mixed, full fp32 again afterwards."""
    from lightning.pytorch import Callback, Trainer

    from maskvid.launch.matmul_precision import MatmulPrecision
    from tests.tiny_model import TinyVideoModel

    torch.set_float32_matmul_precision("highest")
    seen = []

    class Probe(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                         next(pl_module.parameters()).device.type))

    batches = [{"video": torch.randn(1, 3, 2, 8, 8)} for _ in range(2)]
    trainer = Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=2, logger=False,
                      callbacks=[MatmulPrecision("high"), Probe()], enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(TinyVideoModel(), train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    assert seen == [(True, True, "cuda")] * 2
    assert torch.backends.cuda.matmul.allow_tf32 is False
