"""Fused LM head + log-prob/entropy (kernels/linear_logprob_entropy.py), Triton and torch row ops,
against the float64 eager oracle (logits = hidden @ weight.T, then log_softmax) and gradcheck."""
import os

import pytest
import torch

from fastarcher.kernels.linear_logprob_entropy import default_chunk_size, linear_logprob_entropy
from fastarcher.kernels.reference import eager_linear_logprob_entropy

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_CUDA = torch.cuda.is_available()
GPU = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")]
# (device, use_triton): the torch row op anywhere, the Triton one on CUDA or in the interpreter.
PATHS = [
    pytest.param("cpu", False, id="cpu-torch"),
    pytest.param("cpu", True, id="cpu-triton",
                 marks=pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1")),
    pytest.param("cuda", False, id="cuda-torch", marks=GPU),
    pytest.param("cuda", True, id="cuda-triton", marks=GPU),
]


def _case(N, H, V, device, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(device=device, dtype=dtype)
    weight = (torch.randn(V, H, generator=g) * 2.0 / H**0.5).to(device=device, dtype=dtype)
    targets = torch.randint(0, V, (N,), generator=g).to(device)
    targets[N // 2] = -100
    g_logp = torch.randn(N, generator=g).to(device)
    g_entropy = torch.randn(N, generator=g).to(device)
    return hidden, weight, targets, g_logp, g_entropy


def _grads(fn, hidden, weight, targets, g_logp, g_entropy, **kwargs):
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    logp, entropy = fn(h, w, targets, **kwargs)
    (logp * g_logp.to(logp.dtype) + entropy * g_entropy.to(logp.dtype)).sum().backward()
    return logp, entropy, h.grad, w.grad


@pytest.mark.parametrize("device,use_triton", PATHS)
@pytest.mark.parametrize("dtype,atol,rtol", [(torch.float32, 1e-5, 1e-4),
                                             (torch.bfloat16, 5e-2, 5e-2)])
@pytest.mark.parametrize("N,H,V,chunk_size", [(1, 8, 5, None), (7, 16, 1000, 3), (9, 32, 4099, 4)])
def test_linear_matches_float64_oracle(device, use_triton, dtype, atol, rtol, N, H, V, chunk_size):
    hidden, weight, targets, g_logp, g_entropy = _case(N, H, V, device, dtype, seed=N + V)
    logp, entropy, dh, dw = _grads(linear_logprob_entropy, hidden, weight, targets, g_logp,
                                   g_entropy, temperature=0.8, chunk_size=chunk_size,
                                   use_triton=use_triton)
    # Oracle in float64 on the same rounded inputs; bf16 differs by the bf16 rounding of the logits
    # (which the unfused LM head has too) and of the gradients.
    ref = _grads(eager_linear_logprob_entropy, hidden.double(), weight.double(), targets,
                 g_logp, g_entropy, temperature=0.8)
    assert logp.dtype == torch.float32 and dh.dtype == dw.dtype == dtype
    for got, want in zip((logp, entropy, dh, dw), ref):
        torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol)
    assert torch.all(dh[N // 2] == 0)  # ignored token: no gradient to its hidden state


@pytest.mark.parametrize("device,use_triton", PATHS)
def test_linear_frozen_weight_and_entropy_only(device, use_triton):
    hidden, weight, targets, _, g_entropy = _case(6, 16, 300, device, torch.float32, seed=1)
    h = hidden.clone().requires_grad_()
    _, entropy = linear_logprob_entropy(h, weight, targets, chunk_size=4, use_triton=use_triton)
    (entropy * g_entropy).sum().backward()
    h64 = hidden.double().requires_grad_()
    _, entropy64 = eager_linear_logprob_entropy(h64, weight.double(), targets)
    (entropy64 * g_entropy.double()).sum().backward()
    torch.testing.assert_close(h.grad.double(), h64.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("device,use_triton", PATHS)
def test_linear_ignored_tokens_give_zero_outputs_and_gradients(device, use_triton):
    hidden, weight, targets, g_logp, g_entropy = _case(4, 8, 50, device, torch.float32, seed=2)
    targets[:] = -100
    logp, entropy, dh, dw = _grads(linear_logprob_entropy, hidden, weight, targets, g_logp,
                                   g_entropy, chunk_size=3, use_triton=use_triton)
    assert torch.all(logp == 0) and torch.all(entropy == 0)
    assert torch.all(dh == 0) and torch.all(dw == 0)


def test_linear_gradcheck_float64_torch_path():
    torch.manual_seed(0)
    hidden = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([1, -100, 8, 0, 3])
    assert torch.autograd.gradcheck(
        lambda h, w: linear_logprob_entropy(h, w, targets, temperature=1.5, chunk_size=2,
                                            use_triton=False), (hidden, weight))


def test_default_chunk_size_keeps_chunk_logits_near_hidden_size():
    # Liger's rule: chunk * V ~ N * H (rounded up to a power of 2), at least 2^22 elements.
    assert default_chunk_size(16384, 4096, 152064) == 512
    assert default_chunk_size(4096, 2048, 32768) == 256
    assert default_chunk_size(3, 64, 152064) == 3  # never more than N
    assert default_chunk_size(100000, 8, 10) == 100000


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_linear_triton_bf16_realistic_shape_on_gpu():
    hidden, weight, targets, g_logp, g_entropy = _case(1024, 2048, 32000, "cuda", torch.bfloat16,
                                                       seed=3)
    got = _grads(linear_logprob_entropy, hidden, weight, targets, g_logp, g_entropy,
                 chunk_size=256, use_triton=True)
    ref = _grads(eager_linear_logprob_entropy, hidden.float(), weight.float(), targets, g_logp,
                 g_entropy)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.float(), b.float(), atol=5e-2, rtol=5e-2)
