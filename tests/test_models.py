import torch

from dumo.models import ModelConfig, build_model, count_parameters


def test_dual_head_shares_the_backbone_and_adds_one_head():
    cfg = ModelConfig(hidden_dim=64, depth=3)
    single = build_model(cfg, (2,), ("v",))
    dual = build_model(cfg, (2,), ("v", "u"))
    head = count_parameters(dual.heads["u"])
    assert count_parameters(dual) == count_parameters(single) + head
    assert count_parameters(dual.backbone) == count_parameters(single.backbone)
    out = dual(torch.randn(5, 2), torch.rand(5))
    assert out.v.shape == out.u.shape == (5, 2)
    assert single(torch.randn(5, 2), torch.rand(5)).u is None


def test_heads_start_at_zero_and_diverge_after_training_signal():
    model = build_model(ModelConfig(hidden_dim=32, depth=1), (2,), ("v", "u"))
    out = model(torch.randn(4, 2), torch.rand(4))
    assert torch.count_nonzero(out.v) == 0 and torch.count_nonzero(out.u) == 0


def test_meanflow_network_reads_the_second_time():
    model = build_model(ModelConfig(hidden_dim=32, depth=1), (2,), ("u",), time_inputs=2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x, t = torch.randn(4, 2), torch.full((4,), 0.9)
    assert not torch.allclose(model(x, t, r=torch.zeros(4)).u, model(x, t, r=t).u)


def test_null_class_is_the_unconditional_call():
    model = build_model(ModelConfig(hidden_dim=32, depth=1), (2,), ("v",), num_classes=3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x, t = torch.randn(4, 2), torch.rand(4)
    null = torch.full((4,), 3)
    assert torch.equal(model(x, t, cond=None).v, model(x, t, cond=null).v)
    assert not torch.allclose(model(x, t, cond=torch.zeros(4, dtype=torch.long)).v, model(x, t, cond=null).v)


def test_time_embedding_is_fp32_under_autocast():
    model = build_model(ModelConfig(hidden_dim=32, depth=1), (2,), ("v",))
    features = []
    model.backbone.conditioning.time.mlp.register_forward_pre_hook(lambda m, args: features.append(args[0].dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(3, 2), torch.rand(3))
    assert features == [torch.float32]


def test_head_blocks_run_under_autocast_and_the_output_layers_in_fp32():
    """model.head_blocks: a head's own blocks cost what the trunk's cost (bf16 matmuls under autocast);
    only the final layers run in fp32 (the finite difference divides head outputs by 2e)."""
    model = build_model(
        ModelConfig(name="DiT-XS/4", hidden_dim=32, depth=2, num_heads=2, head_blocks=1), (1, 8, 8), ("v", "u")
    )
    dtypes = {}
    for name, head in model.heads.items():
        head.blocks[0].mlp[0].register_forward_hook(
            lambda m, a, out, name=name: dtypes.update({f"{name} block": out.dtype})
        )
        head.linear.register_forward_hook(lambda m, a, out, name=name: dtypes.update({f"{name} output": out.dtype}))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(3, 1, 8, 8), torch.rand(3))
    assert dtypes == {
        "v block": torch.bfloat16,
        "u block": torch.bfloat16,
        "v output": torch.float32,
        "u output": torch.float32,
    }
    assert out.v.dtype == out.u.dtype == torch.float32
