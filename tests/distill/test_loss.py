import torch
import torch.nn.functional as F

from eupe.config import LossConfig
from eupe.distill.loss import distill_loss


def _paper_formula(s_cls, s_patch, t_cls, t_patch):
    """Written out independently: cls cosine + 0.9 patch cosine + 0.1 patch smooth-L1 (beta 1)."""
    def cos_dist(a, b):
        a = a / a.norm(dim=-1, keepdim=True)
        b = b / b.norm(dim=-1, keepdim=True)
        return (1 - (a * b).sum(-1)).mean()

    d = (s_patch - t_patch).abs()
    smooth_l1 = torch.where(d < 1.0, 0.5 * d**2, d - 0.5).mean()
    return cos_dist(s_cls, t_cls) + 0.9 * cos_dist(s_patch, t_patch) + 0.1 * smooth_l1


def test_loss_equals_the_papers_formula():
    g = torch.Generator().manual_seed(0)
    s_cls, t_cls = torch.randn(4, 24, generator=g), torch.randn(4, 24, generator=g)
    s_patch, t_patch = torch.randn(4, 49, 32, generator=g) * 2, torch.randn(4, 49, 32, generator=g) * 2
    got = distill_loss(s_cls, s_patch, t_cls, t_patch, LossConfig())
    torch.testing.assert_close(got, _paper_formula(s_cls, s_patch, t_cls, t_patch), rtol=1e-6, atol=1e-6)


def test_loss_is_zero_on_perfect_prediction_and_has_gradients():
    t_cls, t_patch = torch.randn(2, 8), torch.randn(2, 9, 8)
    assert distill_loss(t_cls, t_patch, t_cls, t_patch, LossConfig()).item() < 1e-6
    s = t_patch.clone().requires_grad_(True)
    distill_loss(t_cls, s + 1, t_cls, t_patch, LossConfig()).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_weights_come_from_config():
    s_cls, t_cls, s_patch, t_patch = torch.randn(2, 8), torch.randn(2, 8), torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    only_l1 = LossConfig(cls_cosine=0, patch_cosine=0, patch_smooth_l1=1.0, smooth_l1_beta=0.5)
    torch.testing.assert_close(distill_loss(s_cls, s_patch, t_cls, t_patch, only_l1),
                               F.smooth_l1_loss(s_patch, t_patch, beta=0.5))
