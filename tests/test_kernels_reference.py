"""Torch log-prob/entropy paths (kernels/reference.py, kernels/chunked.py) against hand-computed
values, a float64 oracle and float64 gradcheck."""
import math

import pytest
import torch

from fastarcher.kernels.chunked import chunked_logprob_entropy
from fastarcher.kernels.reference import eager_logprob_entropy

NEG_INF = float("-inf")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])]


def _hand_example():
    # Row 0: logits log([1, 2, 1]) -> p = [1/4, 1/2, 1/4]; target 1: logp = -log 2,
    #        H = -(2 * 1/4 log 1/4 + 1/2 log 1/2) = 1.5 log 2.
    # Row 1: logits [0, 0, -inf] (masked entry) -> p = [1/2, 1/2, 0]; target 0: logp = -log 2,
    #        H = log 2; the masked entry gets zero gradient.
    # Row 2: ignored (target -100), all -inf: logp = H = 0 and zero gradient, no NaN.
    logits = torch.tensor([[0.0, math.log(2.0), 0.0], [0.0, 0.0, NEG_INF], [NEG_INF] * 3])
    targets = torch.tensor([1, 0, -100])
    logp = torch.tensor([-math.log(2.0), -math.log(2.0), 0.0])
    entropy = torch.tensor([1.5 * math.log(2.0), math.log(2.0), 0.0])
    # d(sum logp)/dz = onehot - p.
    grad_logp = torch.tensor([[-0.25, 0.5, -0.25], [0.5, -0.5, 0.0], [0.0, 0.0, 0.0]])
    # dH/dz_j = -p_j (log p_j + H): row 0: -1/4 (-2 log 2 + 1.5 log 2) = log 2 / 8 for j = 0, 2
    # and -1/2 (-log 2 + 1.5 log 2) = -log 2 / 4 for j = 1; row 1: -1/2 (-log 2 + log 2) = 0.
    l2 = math.log(2.0)
    grad_entropy = torch.tensor([[l2 / 8, -l2 / 4, l2 / 8], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    return logits, targets, logp, entropy, grad_logp, grad_entropy


@pytest.mark.parametrize("fn", [eager_logprob_entropy, chunked_logprob_entropy])
@pytest.mark.parametrize("output", ["logp", "entropy"])
def test_torch_paths_match_hand_computed_values_and_gradients(fn, output):
    logits, targets, logp_ref, entropy_ref, grad_logp, grad_entropy = _hand_example()
    logits.requires_grad_()
    logp, entropy = fn(logits, targets)
    torch.testing.assert_close(logp, logp_ref)
    torch.testing.assert_close(entropy, entropy_ref)
    (logp if output == "logp" else entropy).sum().backward()
    torch.testing.assert_close(logits.grad, grad_logp if output == "logp" else grad_entropy)


def test_temperature_divides_logits_before_softmax():
    # logits [0, 2 log 2] at T = 2 -> z = [0, log 2] -> p = [1/3, 2/3].
    logits = torch.tensor([[0.0, 2 * math.log(2.0)]])
    for fn in (eager_logprob_entropy, chunked_logprob_entropy):
        logp, entropy = fn(logits, torch.tensor([1]), temperature=2.0)
        torch.testing.assert_close(logp, torch.tensor([math.log(2 / 3)]))
        h = -(1 / 3 * math.log(1 / 3) + 2 / 3 * math.log(2 / 3))
        torch.testing.assert_close(entropy, torch.tensor([h]))


def _random_case(N, V, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, V, generator=g) * scale
    targets = torch.randint(0, V, (N,), generator=g)
    return logits, targets


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,atol,rtol", [(torch.float32, 1e-5, 1e-5),
                                             (torch.bfloat16, 1e-5, 1e-2)])
@pytest.mark.parametrize("N,V,chunk_rows", [(1, 7, None), (5, 123, 2), (4, 129920, 3)])
def test_chunked_matches_float64_oracle(device, dtype, atol, rtol, N, V, chunk_rows):
    torch.manual_seed(0)
    logits, targets = _random_case(N, V, seed=N + V)
    logits[:, 1::17] = NEG_INF  # masked vocabulary entries
    targets = torch.where(targets % 17 == 1, targets - 1, targets)  # never target a masked entry
    targets[N // 2] = -100 if N > 1 else targets[0]
    logits = logits.to(device=device, dtype=dtype)
    targets = targets.to(device)
    x = logits.clone().requires_grad_()
    x64 = logits.double().requires_grad_()  # oracle on the same (rounded) inputs
    logp, entropy = chunked_logprob_entropy(x, targets, temperature=0.7, chunk_rows=chunk_rows)
    logp64, entropy64 = eager_logprob_entropy(x64, targets, temperature=0.7)
    assert logp.dtype == entropy.dtype == torch.float32
    # Accumulation is float32 whatever the input dtype: values are float32-accurate.
    torch.testing.assert_close(logp, logp64.float(), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(entropy, entropy64.float(), atol=1e-4, rtol=1e-5)
    g_logp, g_entropy = torch.randn(N, device=device), torch.randn(N, device=device)
    (logp * g_logp + entropy * g_entropy).sum().backward()
    (logp64 * g_logp + entropy64 * g_entropy).sum().backward()
    assert x.grad.dtype == dtype
    torch.testing.assert_close(x.grad.float(), x64.grad.float(), atol=atol, rtol=rtol)
    assert torch.all(x.grad[:, 1::17] == 0)


def test_chunked_gradcheck_float64_with_masked_entries_and_ignored_rows():
    torch.manual_seed(0)
    logits = torch.randn(5, 9, dtype=torch.float64)
    logits[:, 3] = NEG_INF
    logits[4] = NEG_INF  # fully masked, but ignored
    logits.requires_grad_()
    targets = torch.tensor([0, 8, -100, 5, -100])
    assert torch.autograd.gradcheck(
        lambda x: chunked_logprob_entropy(x, targets, temperature=1.3, chunk_rows=2), (logits,))


def test_eager_oracle_gradcheck_float64():
    torch.manual_seed(0)
    logits = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([2, -100, 5])
    assert torch.autograd.gradcheck(
        lambda x: eager_logprob_entropy(x, targets, temperature=0.8), (logits,))


def test_chunked_all_negative_rows_and_huge_logits():
    torch.manual_seed(0)
    logits = torch.randn(4, 300)
    logits[0] -= 1000.0  # all negative: a running max starting at 0 would give lse = -inf
    logits[1] *= 1e4  # nearly one-hot
    logits[2, 7] = 1e30  # one huge entry: p = one-hot, logp = 0, H = 0
    logits[3] += 1e4
    targets = torch.tensor([3, 5, 7, 11])
    x = logits.clone().requires_grad_()
    x64 = logits.double().requires_grad_()
    logp, entropy = chunked_logprob_entropy(x, targets, chunk_rows=3)
    logp64, entropy64 = eager_logprob_entropy(x64, targets)
    assert logp[2] == 0 and entropy[2] == 0
    torch.testing.assert_close(logp, logp64.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, entropy64.float(), atol=1e-5, rtol=1e-4)
    (logp.sum() + entropy.sum()).backward()
    (logp64.sum() + entropy64.sum()).backward()
    torch.testing.assert_close(x.grad, x64.grad.float(), atol=1e-5, rtol=1e-4)


def test_chunked_entropy_of_peaked_row_is_accurate_in_float32():
    # One logit 25 above the rest, all offset by 1000: H ~ 1e-7. Computing H as lse - sum p z in
    # float32 would lose ~1000 * 6e-8 = 6e-5 to cancellation; the max-relative form must not.
    logits = torch.zeros(2, 1000, dtype=torch.float64)
    logits[:, 0] = 25.0
    logits[1] += 1000.0
    entropy64 = eager_logprob_entropy(logits, torch.tensor([0, 0]))[1]
    _, entropy = chunked_logprob_entropy(logits.float(), torch.tensor([0, 0]))
    torch.testing.assert_close(entropy.double(), entropy64, atol=1e-7, rtol=2e-2)
    assert entropy64[1] > 1e-8
