"""The trainer's entry point fastarcher.logprobs: every backend agrees with the float64 eager
oracle, including masked (-inf) vocabulary entries, temperature, ignored rows and leading dims."""
import os

import pytest
import torch

from fastarcher import logprobs
from fastarcher.kernels.reference import eager_logprob_entropy
from fastarcher.logprobs import linear_token_logprobs_and_entropy, token_logprobs_and_entropy

NEG_INF = float("-inf")
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_CUDA = torch.cuda.is_available()
GPU = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")]
NO_INTERPRET = pytest.mark.skipif(not INTERPRET, reason="triton on CPU needs TRITON_INTERPRET=1")
BACKENDS = [
    pytest.param("cpu", "auto", id="cpu-auto"),
    pytest.param("cpu", "eager", id="cpu-eager"),
    pytest.param("cpu", "torch_chunked", id="cpu-torch_chunked"),
    pytest.param("cpu", "triton", id="cpu-triton", marks=NO_INTERPRET),
    pytest.param("cuda", "auto", id="cuda-auto", marks=GPU),
    pytest.param("cuda", "torch_chunked", id="cuda-torch_chunked", marks=GPU),
]


def _masked_case(device, dtype=torch.float32):
    """(B=2, T=3, V=40) logits where only an 'allowed action set' of 5 tokens is left unmasked."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 40, generator=g) * 4
    allowed = torch.tensor([3, 7, 8, 20, 39])
    mask = torch.full((40,), NEG_INF)
    mask[allowed] = 0.0
    logits = logits + mask  # -inf outside the allowed set
    targets = allowed[torch.randint(0, 5, (2, 3), generator=g)]
    targets[1, 2] = -100  # padding
    return logits.to(device=device, dtype=dtype), targets.to(device), allowed


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_backends_agree_with_oracle_under_vocab_mask(device, backend, temperature):
    logits, targets, allowed = _masked_case(device)
    x = logits.clone().requires_grad_()
    logp, entropy = token_logprobs_and_entropy(x, targets, temperature=temperature,
                                               backend=backend)
    assert logp.shape == entropy.shape == targets.shape and logp.dtype == torch.float32
    g = torch.Generator().manual_seed(1)
    g_logp, g_entropy = torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)
    (logp * g_logp.to(device) + entropy * g_entropy.to(device)).sum().backward()
    # Oracle: float64, and independently computed on the allowed columns only (softmax over a
    # subset = softmax over the full row with -inf elsewhere).
    sub = logits[..., allowed.to(device)].double().reshape(6, 5).requires_grad_()
    sub_targets = torch.searchsorted(allowed, targets.cpu().clamp(min=0)).reshape(6)
    sub_targets[targets.cpu().reshape(6) == -100] = -100
    logp64, entropy64 = eager_logprob_entropy(sub, sub_targets.to(device), temperature=temperature)
    (logp64 * g_logp.reshape(6).double().to(device)
     + entropy64 * g_entropy.reshape(6).double().to(device)).sum().backward()
    torch.testing.assert_close(logp.reshape(6).double(), logp64, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy.reshape(6).double(), entropy64, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(x.grad).all()
    expected = torch.zeros_like(x.grad, dtype=torch.float64)
    expected[..., allowed.to(device)] = sub.grad.reshape(2, 3, 5)
    torch.testing.assert_close(x.grad.double(), expected, atol=1e-6, rtol=1e-5)
    assert torch.all(x.grad[1, 2] == 0)  # ignored position


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_linear_backends_agree_with_logits_path(device, backend):
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 5, 16, generator=g).to(device)
    weight = (torch.randn(300, 16, generator=g) / 4).to(device)
    targets = torch.randint(0, 300, (2, 5), generator=g).to(device)
    targets[0, 0] = -100
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp, entropy = linear_token_logprobs_and_entropy(h, w, targets, temperature=0.9,
                                                      backend=backend, chunk_size=3)
    (logp.sum() - 0.1 * entropy.sum()).backward()
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    logp64, entropy64 = token_logprobs_and_entropy(h64 @ w64.t(), targets, temperature=0.9,
                                                   backend="eager")
    (logp64.sum() - 0.1 * entropy64.sum()).backward()
    assert logp.shape == targets.shape
    torch.testing.assert_close(logp.double(), logp64, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy.double(), entropy64, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h.grad.double(), h64.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(w.grad.double(), w64.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ["eager", "torch_chunked",
                                     pytest.param("triton", marks=NO_INTERPRET)])
def test_target_on_masked_entry_has_minus_inf_logp(backend):
    logits = torch.tensor([[0.0, NEG_INF, 1.0]])
    logp, entropy = token_logprobs_and_entropy(logits, torch.tensor([1]), backend=backend)
    assert logp.item() == NEG_INF and torch.isfinite(entropy).all()


def test_auto_backend_resolution():
    assert logprobs.resolve_backend("auto", torch.device("cpu")) == "torch_chunked"
    assert logprobs.resolve_backend("eager", torch.device("cpu")) == "eager"


def test_triton_backend_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend 'triton' needs CUDA tensors"):
        logprobs.resolve_backend("triton", torch.device("cpu"))


def test_invalid_arguments_name_the_field():
    logits, targets = torch.randn(3, 5), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match=r"backend \('fast'\) must be one of"):
        token_logprobs_and_entropy(logits, targets, backend="fast")
    with pytest.raises(ValueError, match=r"temperature \(0.0\) must be > 0"):
        token_logprobs_and_entropy(logits, targets, temperature=0.0)
    with pytest.raises(ValueError, match=r"targets shape \(2,\) must equal"):
        token_logprobs_and_entropy(logits, targets[:2])
    with pytest.raises(ValueError, match=r"weight shape \(5, 3\) must be \(V, 4\)"):
        linear_token_logprobs_and_entropy(torch.randn(3, 4), torch.randn(5, 3), targets)
    with pytest.raises(ValueError, match=r"chunk_size \(0\) must be >= 1"):
        linear_token_logprobs_and_entropy(torch.randn(3, 4), torch.randn(5, 4), targets,
                                          chunk_size=0)
