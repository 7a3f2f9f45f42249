"""Influence scores vs explicit float64 references: dense D-vectors, dot products, torch.linalg.solve."""
import pytest
import torch

from fastarcher.traces.scores import (
    ExplicitSamples,
    FactoredSamples,
    Factors,
    accept_flags,
    contrast_coefficients,
    identity_token_scores_gram,
    response_gradients,
    score_step,
    solve_damped,
    token_scores,
    token_vectors,
    unit_ids_for,
)

BLOCKS = [(3, 4), (2, 5)]  # (k_out, k_in) per module: D = 12 + 10 = 22
COUNTS = [3, 1, 4, 2, 5]  # tokens per response


def _factors(counts=COUNTS, seed=0):
    g = torch.Generator().manual_seed(seed)
    n, r = sum(counts), len(counts)
    return Factors(
        u=[torch.randn(n, k_out, generator=g, dtype=torch.float64) for k_out, _ in BLOCKS],
        v=[torch.randn(n, k_in, generator=g, dtype=torch.float64) for _, k_in in BLOCKS],
        context=[torch.randn(r, k_out, k_in, generator=g, dtype=torch.float64) for k_out, k_in in BLOCKS],
        response_offsets=torch.tensor([0] + torch.tensor(counts).cumsum(0).tolist()),
    )


def _dense_tokens(f):
    """(N, D) by explicit outer products, one token at a time."""
    rows = []
    for n in range(f.n_tokens):
        rows.append(torch.cat([torch.outer(u[n], v[n]).flatten() for u, v in zip(f.u, f.v)]))
    return torch.stack(rows)


def _dense_responses(f):
    tokens = _dense_tokens(f)
    out = []
    for r in range(f.n_responses):
        ctx = torch.cat([c[r].flatten() for c in f.context])
        out.append(tokens[f.response_offsets[r]:f.response_offsets[r + 1]].sum(0) + ctx)
    return torch.stack(out)


# Hand example: 5 responses, groups [0, 0, 0, 1, 1]
ADV = torch.tensor([0.5, -1.0, 2.0, 0.0, -0.3], dtype=torch.float64)
GROUPS = torch.tensor([0, 0, 0, 1, 1])


def test_token_and_response_vectors_match_outer_products():
    f = _factors()
    torch.testing.assert_close(token_vectors(f.u, f.v), _dense_tokens(f))
    torch.testing.assert_close(response_gradients(f), _dense_responses(f))


def test_accept_flags_follow_the_stated_rules():
    # advantage rule: sign(A); NaN counts as neither
    got = accept_flags(torch.tensor([0.5, -1.0, 0.0, float("nan")]), torch.zeros(4, dtype=torch.long), "advantage")
    assert got.tolist() == [1, -1, 0, 0]
    # reward rule: above/below the mean of its group; group 0 mean 0.5, group 1 mean 0.1 (all equal -> neither)
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.1, 0.1, 0.1], dtype=torch.float64)
    got = accept_flags(rewards, torch.tensor([0, 0, 0, 1, 1, 1]), "reward")
    assert got.tolist() == [1, -1, 0, 0, 0, 0]


def test_contrast_coefficients_hand_computed():
    flags = accept_flags(ADV, GROUPS, "advantage")  # [1, -1, 1, 0, -1]
    sign = ADV  # objective weight = advantage
    # per_prompt / mean: group 0 has 2 accepted, 1 rejected: w = [+1/2, (-1/1)(-1), +1/2, 0, ...];
    # group 1: response 4 rejected alone, weight sign -1 -> (-1/1)(-1) = +1
    units, k = unit_ids_for(GROUPS, "per_prompt")
    w, n_acc, n_rej = contrast_coefficients(flags, sign, units, k, "mean")
    assert w.tolist() == [0.5, 1.0, 0.5, 0.0, 1.0]
    assert n_acc.tolist() == [2, 0] and n_rej.tolist() == [1, 1]
    # all_selected / sum: +-1 times sign(weight)
    units, k = unit_ids_for(GROUPS, "all_selected")
    w, _, _ = contrast_coefficients(flags, sign, units, k, "sum")
    assert w.tolist() == [1.0, 1.0, 1.0, 0.0, 1.0]
    # reward-weighted objective with positive weights: rejected responses get -1/|R|
    w, _, _ = contrast_coefficients(flags, torch.ones(5, dtype=torch.float64), units, k, "mean")
    assert w.tolist() == [0.5, -0.5, 0.5, 0.0, -0.5]


def _explicit_directions(f, w, units, k):
    g = _dense_responses(f)
    d = torch.zeros(k, g.shape[1], dtype=torch.float64)
    for r in range(f.n_responses):
        d[units[r]] += w[r] * g[r]
    return g, d


@pytest.mark.parametrize("scope", ["per_prompt", "all_selected"])
@pytest.mark.parametrize("agg", ["sum", "mean"])
@pytest.mark.parametrize("identity_method", ["direct", "gram"])
def test_identity_scores_equal_explicit_dot_products(scope, agg, identity_method):
    f = _factors()
    result = score_step(f, signal=ADV, weights=ADV, group_ids=GROUPS, hessian_mode="identity", scope=scope, agg=agg,
                        identity_method=identity_method)
    units, k = unit_ids_for(GROUPS, scope)
    w, _, _ = contrast_coefficients(accept_flags(ADV, GROUPS, "advantage"), ADV, units, k, agg)
    g, d = _explicit_directions(f, w, units, k)
    tokens = _dense_tokens(f)
    token_unit = units[f.token_response]
    expected_tok = torch.stack([tokens[n] @ d[token_unit[n]] for n in range(f.n_tokens)])
    expected_resp = torch.stack([g[r] @ d[units[r]] for r in range(f.n_responses)])
    torch.testing.assert_close(result.token_scores, expected_tok)
    torch.testing.assert_close(result.response_scores, expected_resp)
    assert result.method == f"identity-{identity_method}"
    torch.testing.assert_close(result.token_grad_norm, tokens.norm(dim=1))
    torch.testing.assert_close(result.response_grad_norm, g.norm(dim=1))


def test_gram_path_equals_direct_path():
    f = _factors(seed=3)
    w = torch.tensor([0.3, -1.2, 0.0, 2.0, 0.7], dtype=torch.float64)
    units = torch.tensor([0, 1, 0, 1, 1])
    directions = torch.zeros(2, f.dim, dtype=torch.float64).index_add_(0, units, response_gradients(f) * w[:, None])
    direct = token_scores(f, directions, units[f.token_response])
    torch.testing.assert_close(identity_token_scores_gram(f, w, units), direct)


@pytest.mark.parametrize("source", ["response", "token"])
@pytest.mark.parametrize("damping", [None, 0.37])
def test_inverse_scores_equal_linalg_solve(source, damping):
    f = _factors(seed=1)
    result = score_step(f, signal=ADV, weights=ADV, group_ids=GROUPS, hessian_mode="inverse", hessian_source=source,
                        damping=damping, scope="per_prompt", agg="mean")
    units, k = unit_ids_for(GROUPS, "per_prompt")
    w, _, _ = contrast_coefficients(accept_flags(ADV, GROUPS, "advantage"), ADV, units, k, "mean")
    g, d = _explicit_directions(f, w, units, k)
    tokens = _dense_tokens(f)
    samples = g if source == "response" else tokens
    n, dim = samples.shape
    lam = damping if damping is not None else 0.1 * torch.trace(samples.T @ samples / n).item() / dim
    hessian = samples.T @ samples / n + lam * torch.eye(dim, dtype=torch.float64)
    q = torch.linalg.solve(hessian, d.T).T  # (K, D)
    token_unit = units[f.token_response]
    expected_tok = torch.stack([tokens[i] @ q[token_unit[i]] for i in range(f.n_tokens)])
    expected_resp = torch.stack([g[r] @ q[units[r]] for r in range(f.n_responses)])
    assert result.damping == pytest.approx(lam, rel=1e-12)
    torch.testing.assert_close(result.token_scores, expected_tok)
    torch.testing.assert_close(result.response_scores, expected_resp)
    # N < D for responses (5 < 22) -> Woodbury; tokens (15 < 22) too
    assert result.method == f"inverse-{source}-woodbury"


@pytest.mark.parametrize("n", [6, 40])  # fewer and more samples than D = 22
def test_woodbury_equals_direct_solve(n):
    g = torch.Generator().manual_seed(n)
    samples = torch.randn(n, 22, generator=g, dtype=torch.float64)
    rhs = torch.randn(3, 22, generator=g, dtype=torch.float64)
    explicit = ExplicitSamples(samples)
    wood, lam_w, m_w = solve_damped(explicit, rhs, 0.05, "woodbury")
    direct, lam_d, m_d = solve_damped(explicit, rhs, 0.05, "direct")
    reference = torch.linalg.solve(samples.T @ samples / n + 0.05 * torch.eye(22, dtype=torch.float64), rhs.T).T
    torch.testing.assert_close(wood, reference)
    torch.testing.assert_close(direct, reference)
    assert (m_w, m_d) == ("woodbury", "direct")


def test_factored_samples_match_explicit_token_matrix():
    f = _factors(seed=2)
    dense = ExplicitSamples(_dense_tokens(f))
    factored = FactoredSamples(f, chunk=4)
    q = torch.randn(2, f.dim, dtype=torch.float64)
    y = torch.randn(f.n_tokens, 2, dtype=torch.float64)
    torch.testing.assert_close(factored.gram(), dense.gram())
    torch.testing.assert_close(factored.outer(), dense.outer())
    torch.testing.assert_close(factored.apply(q), dense.apply(q))
    torch.testing.assert_close(factored.adjoint(y), dense.adjoint(y))
    torch.testing.assert_close(factored.squared_norm_sum(), dense.squared_norm_sum())
    for method in ("woodbury", "direct"):
        got, _, _ = solve_damped(factored, q, 0.2, method)
        want, _, _ = solve_damped(dense, q, 0.2, "direct")
        torch.testing.assert_close(got, want)


def test_token_scores_sum_with_context_to_response_score():
    f = _factors(seed=4)
    result = score_step(f, signal=ADV, weights=ADV, group_ids=GROUPS, hessian_mode="identity")
    per_response = torch.zeros(f.n_responses, dtype=torch.float64).index_add_(0, f.token_response, result.token_scores)
    torch.testing.assert_close(per_response + result.context_scores, result.response_scores)


def test_no_contrast_gives_zero_scores():
    f = _factors()
    zeros = torch.zeros(5, dtype=torch.float64)
    result = score_step(f, signal=zeros, weights=zeros, group_ids=GROUPS, hessian_mode="identity")
    assert result.accepted.tolist() == [0] * 5
    assert torch.count_nonzero(result.token_scores) == 0
