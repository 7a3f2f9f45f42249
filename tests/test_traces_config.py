"""Trace config: tyro flags --trace.influence.* / --trace.entropy.*, defaults off, validation messages."""
import ast
import inspect
from dataclasses import dataclass, field, fields

import pytest
import tyro

from fastarcher.traces import config as config_module
from fastarcher.traces.config import EntropyTraceConfig, InfluenceTraceConfig, TraceConfig
from fastarcher.traces.projection import projection_sizes, rademacher_matrix


@dataclass(kw_only=True)
class _Root:
    trace: TraceConfig = field(default_factory=TraceConfig)
    """Traces."""


def test_defaults_are_off():
    cfg = TraceConfig()
    assert cfg.influence.enabled is False and cfg.entropy.enabled is False


def test_tyro_flags_reach_nested_fields():
    cfg = tyro.cli(_Root, args=[
        "--trace.influence.enabled",
        "--trace.influence.module-name-filter", "down_proj", "lm_head",
        "--trace.influence.hessian-mode", "inverse",
        "--trace.influence.damping", "0.5",
        "--trace.entropy.enabled",
        "--trace.entropy.quantiles", "0.5", "0.9",
    ])
    assert cfg.trace.influence.enabled and cfg.trace.influence.module_name_filter == ("down_proj", "lm_head")
    assert cfg.trace.influence.hessian_mode == "inverse" and cfg.trace.influence.damping == 0.5
    assert cfg.trace.entropy.enabled and cfg.trace.entropy.quantiles == (0.5, 0.9)


def test_every_field_has_a_docstring():
    tree = ast.parse(inspect.getsource(config_module))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name.endswith("Config"):
            body = node.body
            for i, item in enumerate(body):
                if isinstance(item, ast.AnnAssign):
                    doc = body[i + 1] if i + 1 < len(body) else None
                    has_doc = isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)
                    assert has_doc, (node.name, item.target.id)
    assert {f.name for f in fields(InfluenceTraceConfig)} >= {
        "module_name_filter", "max_modules", "max_tokens_per_response", "max_prompts_per_step", "projection_dim_factor",
        "max_proj_vector_sum", "max_hessian_dim", "output_function", "hessian_mode", "hessian_source", "damping",
        "accepted_rejected_scope", "contrastive_agg", "grad_offload_to_cpu", "force_gpu_compute", "profile_timing",
        "seed", "every_n_steps"}


@pytest.mark.parametrize("kwargs, message", [
    (dict(every_n_steps=0), r"trace.influence.every_n_steps \(0\) must be >= 1"),
    (dict(max_modules=-1), r"trace.influence.max_modules \(-1\) must be >= 0"),
    (dict(projection_dim_factor=0), r"trace.influence.projection_dim_factor \(0\) must be >= 1"),
    (dict(hessian_mode="diag"), r"trace.influence.hessian_mode \('diag'\) must be one of"),
    (dict(output_function="loss"), r"trace.influence.output_function \('loss'\) must be one of"),
    (dict(damping=-1.0), r"trace.influence.damping \(-1.0\) must be a finite number > 0"),
    (dict(module_name_filter="down_proj"), r"trace.influence.module_name_filter \('down_proj'\) must be a tuple"),
    (dict(accepted_rejected_scope="batch"), r"trace.influence.accepted_rejected_scope \('batch'\)"),
])
def test_influence_validation_names_field_value_rule(kwargs, message):
    with pytest.raises(ValueError, match=message):
        InfluenceTraceConfig(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(quantiles=(0.5, 1.5)), r"trace.entropy.quantiles .* must lie in \[0, 1\]"),
    (dict(high_entropy_threshold=float("nan")), r"trace.entropy.high_entropy_threshold \(nan\)"),
    (dict(max_responses_per_step=-2), r"trace.entropy.max_responses_per_step \(-2\) must be >= 0"),
])
def test_entropy_validation_names_field_value_rule(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EntropyTraceConfig(**kwargs)


def test_projection_sizes_follow_the_documented_rule():
    # Qwen2.5-0.5B down_proj shape (d_in 4864, d_out 896), four modules, factor 16:
    # k = (304, 56); sum 4 * 360 = 1440 > 1024 -> x 1024/1440 -> (216, 39); D = 4 * 8424 > 4096 ->
    # x sqrt(4096 / 33696) = 0.3487 -> (75, 13); D = 4 * 975 = 3900.
    sizes = projection_sizes([(4864, 896)] * 4, dim_factor=16, max_vector_sum=1024, max_hessian_dim=4096)
    assert sizes == [(75, 13)] * 4
    assert projection_sizes([(10, 6)], dim_factor=4, max_vector_sum=100, max_hessian_dim=100) == [(3, 2)]
    with pytest.raises(ValueError, match=r"trace.influence.max_hessian_dim \(2\)"):
        projection_sizes([(8, 8)] * 3, dim_factor=1, max_vector_sum=100, max_hessian_dim=2)


def test_rademacher_is_seeded_per_name_and_scaled():
    a = rademacher_matrix(8, 20, seed=3, name="x")
    assert a.abs().unique().tolist() == [pytest.approx(8 ** -0.5)]
    assert (rademacher_matrix(8, 20, seed=3, name="x") == a).all()
    assert not (rademacher_matrix(8, 20, seed=3, name="y") == a).all()
    assert not (rademacher_matrix(8, 20, seed=4, name="x") == a).all()
