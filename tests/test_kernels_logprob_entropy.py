"""Triton log-prob/entropy kernels (kernels/logprob_entropy.py) against the float64 eager oracle
(kernels/reference.py); on the CPU they run under TRITON_INTERPRET=1 (set in tests/conftest.py)."""
import os

import pytest
import torch

from fastarcher.kernels.reference import eager_logprob_entropy

NEG_INF = float("-inf")
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_CUDA = torch.cuda.is_available()
# Triton runs on CUDA tensors, or on CPU tensors in the interpreter (only when no GPU is present).
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=[pytest.mark.gpu,
                                pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")]),
]

triton_kernels = pytest.importorskip("fastarcher.kernels.logprob_entropy")
logprob_entropy = triton_kernels.logprob_entropy


def _oracle(logits, targets, g_logp, g_entropy, temperature=1.0):
    """float64 values and gradients of sum(g_logp logp + g_entropy H) on the same inputs."""
    x64 = logits.double().requires_grad_()
    logp, entropy = eager_logprob_entropy(x64, targets, temperature=temperature)
    (logp * g_logp.double() + entropy * g_entropy.double()).sum().backward()
    return logp.float(), entropy.float(), x64.grad


def _run(logits, targets, g_logp, g_entropy, temperature=1.0):
    x = logits.clone().requires_grad_()
    logp, entropy = logprob_entropy(x, targets, temperature=temperature)
    (logp * g_logp + entropy * g_entropy).sum().backward()
    return logp, entropy, x.grad


def _case(N, V, device, dtype, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(N, V, generator=g) * scale).to(device=device, dtype=dtype)
    targets = torch.randint(0, V, (N,), generator=g).to(device)
    g_logp = torch.randn(N, generator=g).to(device)
    g_entropy = torch.randn(N, generator=g).to(device)
    return logits, targets, g_logp, g_entropy


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,grad_atol,grad_rtol", [(torch.float32, 1e-5, 1e-4),
                                                       (torch.bfloat16, 1e-5, 1e-2)])
@pytest.mark.parametrize("N,V,temperature", [(1, 1, 1.0), (3, 123, 0.7), (2, 129920, 1.5)])
def test_triton_matches_float64_oracle(device, dtype, grad_atol, grad_rtol, N, V, temperature):
    # V = 129920 is not a multiple of any power-of-2 block (a fused kernel elsewhere got it wrong).
    logits, targets, g_logp, g_entropy = _case(N, V, device, dtype, seed=V)
    logp, entropy, grad = _run(logits, targets, g_logp, g_entropy, temperature)
    logp64, entropy64, grad64 = _oracle(logits, targets, g_logp, g_entropy, temperature)
    assert logp.dtype == entropy.dtype == torch.float32 and grad.dtype == dtype
    # Inputs are read in their dtype and accumulated in float32: float32-accurate values.
    torch.testing.assert_close(logp, logp64, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, entropy64, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad.float(), grad64.float(), atol=grad_atol, rtol=grad_rtol)


@pytest.mark.parametrize("device", DEVICES)
# The fully masked ignored row computes log(0) and 0/0 in its (discarded) lanes; numpy warns.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_triton_masked_entries_and_ignored_rows(device):
    torch.manual_seed(0)
    N, V = 4, 300
    logits, targets, g_logp, g_entropy = _case(N, V, device, torch.float32, seed=1)
    logits[:, :40] = NEG_INF  # a whole first block (block_v = 16 below) is masked
    logits[:, 100::7] = NEG_INF
    targets[:] = torch.tensor([41, 299, -100, 55], device=device)
    logits[2] = NEG_INF  # ignored row that is entirely masked: must not put NaN anywhere
    logp, entropy, grad = _run(logits, targets, g_logp, g_entropy)
    valid = targets != -100
    logp64, entropy64, grad64 = _oracle(logits, targets, g_logp, g_entropy)
    assert all(torch.isfinite(t).all() for t in (logp, entropy, grad))
    assert logp[2] == 0 and entropy[2] == 0 and torch.all(grad[2] == 0)
    assert torch.all(grad[:, :40] == 0) and torch.all(grad[:, 100::7] == 0)
    torch.testing.assert_close(logp[valid], logp64[valid], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy[valid], entropy64[valid], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, grad64.float(), atol=1e-6, rtol=1e-4)
    # Small blocks: many partial blocks, a first block that is all -inf, a ragged last block.
    fwd = triton_kernels.logprob_entropy_forward(logits, targets, block_v=16)
    torch.testing.assert_close(fwd[0], logp, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(fwd[1], entropy, atol=1e-6, rtol=1e-6)
    small = triton_kernels.logprob_entropy_backward(logits, targets, fwd[2], fwd[3], fwd[1],
                                                    g_logp, g_entropy, block_v=16)
    torch.testing.assert_close(small, grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_triton_all_negative_rows_and_huge_logits(device):
    logits, targets, g_logp, g_entropy = _case(4, 300, device, torch.float32, seed=2, scale=1.0)
    logits[0] -= 1000.0  # all negative: a running max that starts at 0 would give lse = -inf
    logits[1] *= 1e4  # nearly one-hot, magnitudes 1e4
    logits[2, 7] = 1e30  # p = one-hot: logp = 0, H = 0
    logits[3] += 1e4
    targets[2] = 7
    logp, entropy, grad = _run(logits, targets, g_logp, g_entropy)
    logp64, entropy64, grad64 = _oracle(logits, targets, g_logp, g_entropy)
    assert logp[2] == 0 and entropy[2] == 0
    torch.testing.assert_close(logp, logp64, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, entropy64, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grad, grad64.float(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_triton_entropy_of_peaked_row_is_accurate_in_float32(device):
    # One logit 25 above the rest, all offset by 1000, V not a power of 2: H ~ 1e-7. In float32,
    # lse - sum p z would cancel to ~6e-5 absolute error; the max-relative form keeps ~1e-9.
    logits = torch.zeros(2, 1000, dtype=torch.float64)
    logits[:, 0] = 25.0
    logits[1] += 1000.0
    targets = torch.tensor([0, 0])
    entropy64 = eager_logprob_entropy(logits, targets)[1]
    _, entropy = logprob_entropy(logits.float().to(device), targets.to(device))
    torch.testing.assert_close(entropy.double().cpu(), entropy64, atol=1e-8, rtol=2e-2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("used", ["logp", "entropy"])
def test_triton_gradient_of_one_output_alone(device, used):
    logits, targets, g_logp, g_entropy = _case(3, 70, device, torch.float32, seed=3)
    targets[1] = -100
    if used == "logp":
        g_entropy = torch.zeros_like(g_entropy)
    else:
        g_logp = torch.zeros_like(g_logp)
    x = logits.clone().requires_grad_()
    logp, entropy = logprob_entropy(x, targets, temperature=0.9)
    ((logp * g_logp) if used == "logp" else (entropy * g_entropy)).sum().backward()
    _, _, grad64 = _oracle(logits, targets, g_logp, g_entropy, temperature=0.9)
    torch.testing.assert_close(x.grad, grad64.float(), atol=1e-6, rtol=1e-4)
    assert torch.all(x.grad[1] == 0)


@pytest.mark.parametrize("device", DEVICES)
def test_triton_backward_in_place_equals_fresh_buffer(device):
    logits, targets, g_logp, g_entropy = _case(3, 50, device, torch.bfloat16, seed=4)
    logp, entropy, row_max, log_sum = triton_kernels.logprob_entropy_forward(logits, targets)
    fresh = triton_kernels.logprob_entropy_backward(logits, targets, row_max, log_sum, entropy,
                                                    g_logp, g_entropy)
    buffer = logits.clone()
    in_place = triton_kernels.logprob_entropy_backward(buffer, targets, row_max, log_sum, entropy,
                                                       g_logp, g_entropy, out=buffer)
    assert in_place.data_ptr() == buffer.data_ptr()
    torch.testing.assert_close(in_place, fresh, atol=0, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_triton_accepts_row_strided_logits(device):
    # A view whose rows are not contiguous (e.g. every other position of a [B, T, V] tensor).
    logits, targets, g_logp, g_entropy = _case(6, 33, device, torch.float32, seed=5)
    view = logits[::2]
    logp, entropy = logprob_entropy(view, targets[::2])
    logp64, entropy64, _ = _oracle(view, targets[::2], g_logp[::2], g_entropy[::2])
    torch.testing.assert_close(logp, logp64, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, entropy64, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_triton_large_vocab_bf16_on_gpu():
    # A realistic slab: 512 tokens x 152064 vocab in bf16, N * V > 2^26.
    logits, targets, g_logp, g_entropy = _case(512, 152064, "cuda", torch.bfloat16, seed=6)
    targets[::5] = -100
    logp, entropy, grad = _run(logits, targets, g_logp, g_entropy)
    logp64, entropy64, grad64 = _oracle(logits, targets, g_logp, g_entropy)
    torch.testing.assert_close(logp, logp64, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(entropy, entropy64, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(grad.float(), grad64.float(), atol=1e-5, rtol=1e-2)
