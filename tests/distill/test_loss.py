import torch

from eupe.config import LossConfig
from eupe.distill.loss import distill_loss
from reference import cosine_distance, eupe_loss, smooth_l1


def test_loss_equals_the_papers_formula():
    g = torch.Generator().manual_seed(0)
    s_cls, t_cls = torch.randn(4, 24, generator=g), torch.randn(4, 24, generator=g)
    s_patch, t_patch = torch.randn(4, 49, 32, generator=g) * 2, torch.randn(4, 49, 32, generator=g) * 2
    got = distill_loss(s_cls, s_patch, t_cls, t_patch, LossConfig())
    torch.testing.assert_close(got, eupe_loss(s_cls, s_patch, t_cls, t_patch), rtol=1e-6, atol=1e-6)


def test_loss_is_zero_on_perfect_prediction_and_has_gradients():
    t_cls, t_patch = torch.randn(2, 8), torch.randn(2, 9, 8)
    assert distill_loss(t_cls, t_patch, t_cls, t_patch, LossConfig()).item() < 1e-6
    s = t_patch.clone().requires_grad_(True)
    distill_loss(t_cls, s + 1, t_cls, t_patch, LossConfig()).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_each_weight_scales_its_own_term():
    g = torch.Generator().manual_seed(1)
    s_cls, t_cls = torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g)
    s_patch, t_patch = torch.randn(3, 6, 8, generator=g) * 3, torch.randn(3, 6, 8, generator=g)
    cfg = LossConfig(cls_cosine=2.0, patch_cosine=0.5, patch_smooth_l1=0.25, smooth_l1_beta=0.5)
    expected = (2.0 * cosine_distance(s_cls, t_cls) + 0.5 * cosine_distance(s_patch, t_patch)
                + 0.25 * smooth_l1(s_patch, t_patch, beta=0.5))
    torch.testing.assert_close(distill_loss(s_cls, s_patch, t_cls, t_patch, cfg), expected, rtol=1e-6, atol=1e-6)
    only_l1 = LossConfig(cls_cosine=0, patch_cosine=0, patch_smooth_l1=1.0, smooth_l1_beta=0.5)
    torch.testing.assert_close(distill_loss(s_cls, s_patch, t_cls, t_patch, only_l1), smooth_l1(s_patch, t_patch, beta=0.5))


def test_bf16_inputs_give_the_fp32_loss_of_their_values():
    g = torch.Generator().manual_seed(2)
    s_cls, t_cls = torch.randn(2, 8, generator=g).bfloat16(), torch.randn(2, 8, generator=g)
    s_patch, t_patch = torch.randn(2, 5, 8, generator=g).bfloat16(), torch.randn(2, 5, 8, generator=g)
    got = distill_loss(s_cls, s_patch, t_cls, t_patch, LossConfig())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, eupe_loss(s_cls.float(), s_patch.float(), t_cls, t_patch), rtol=1e-6, atol=1e-6)
