"""Losses against plain reference computations (explicit loops / formulas)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from config import load_config
from loss import (
    CenterLoss,
    CrossEntropyLabelSmooth,
    SimCLRLoss,
    SimSiamLoss,
    SupConLoss,
    TripletLoss,
    make_loss,
    make_ssl_loss,
)
from tests.helpers import run_gloo

ATOL = 1e-5


# ----------------------------------------------------------------------------- references
def ref_label_smooth_ce(logits: torch.Tensor, target: torch.Tensor, eps: float = 0.1) -> float:
    """Mean over rows of sum_k -q_k log p_k with q = (1-eps) onehot + eps/C."""
    b, c = logits.shape
    total = 0.0
    for i in range(b):
        row = [float(v) for v in logits[i]]
        lse = math.log(sum(math.exp(v) for v in row))
        for k in range(c):
            q = (1 - eps) * (k == int(target[i])) + eps / c
            total += -q * (row[k] - lse)
    return total / b


def ref_dist(x: torch.Tensor) -> list[list[float]]:
    n = x.shape[0]
    return [[math.sqrt(max(float(((x[i] - x[j]) ** 2).sum()), 1e-12)) for j in range(n)] for i in range(n)]


def ref_batch_hard(x: torch.Tensor, labels: list[int]) -> tuple[list[float], list[float]]:
    d = ref_dist(x)
    n = len(labels)
    ap = [max(d[i][j] for j in range(n) if labels[j] == labels[i]) for i in range(n)]
    an = [min(d[i][j] for j in range(n) if labels[j] != labels[i]) for i in range(n)]
    return ap, an


def ref_supcon(a: torch.Tensor, b: torch.Tensor, la: list[int], lb: list[int]) -> float:
    rows = []
    for i in range(a.shape[0]):
        logits = [float(a[i] @ b[j]) for j in range(b.shape[0])]
        lse = math.log(sum(math.exp(v) for v in logits))
        pos = [logits[j] - lse for j in range(b.shape[0]) if lb[j] == la[i]]
        rows.append(-sum(pos) / len(pos))
    return sum(rows) / len(rows)


def ref_simclr(a: torch.Tensor, b: torch.Tensor, t: float) -> float:
    """NT-Xent over the 2N x 2N similarity of [a; b] with the diagonal removed."""
    n = a.shape[0]
    z = torch.cat([a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)]).double()
    sim = (z @ z.t() / t).tolist()
    total = 0.0
    for r in range(2 * n):
        pos = r + n if r < n else r - n
        denom = sum(math.exp(sim[r][c]) for c in range(2 * n) if c != r)
        total += -(sim[r][pos] - math.log(denom))
    return total / (2 * n)


def _cfg(*opts):
    return load_config(None, list(opts))


# ----------------------------------------------------------------------------- ID loss
def test_label_smooth_ce_matches_reference_and_backprops():
    torch.manual_seed(0)
    logits = torch.randn(6, 5, requires_grad=True)
    target = torch.tensor([0, 4, 2, 2, 1, 3])
    loss = CrossEntropyLabelSmooth(num_classes=5, epsilon=0.1)(logits, target)
    assert loss.item() == pytest.approx(ref_label_smooth_ce(logits.detach(), target), abs=ATOL)
    loss.backward()
    # d/dlogits of mean_i sum_k -q_ik log p_ik = (p - q) / B
    q = torch.full((6, 5), 0.1 / 5)
    q[torch.arange(6), target] += 0.9
    assert torch.allclose(logits.grad, (logits.detach().softmax(1) - q) / 6, atol=1e-6)


def test_label_smooth_ce_is_fp32_for_half_inputs():
    logits = torch.randn(4, 3).half()
    loss = CrossEntropyLabelSmooth(3)(logits, torch.tensor([0, 1, 2, 0]))
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref_label_smooth_ce(logits.float(), torch.tensor([0, 1, 2, 0])), abs=1e-4)


# ----------------------------------------------------------------------------- triplet
LABELS = [0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 3]  # uneven counts per identity


@pytest.mark.parametrize("normalize", [False, True])
def test_triplet_batch_hard_mining_matches_brute_force(normalize):
    torch.manual_seed(1)
    x = torch.randn(len(LABELS), 8)
    _, ap, an = TripletLoss(margin=0.3)(x, torch.tensor(LABELS), normalize_feature=normalize)
    xr = x / x.norm(dim=1, keepdim=True) if normalize else x
    ref_ap, ref_an = ref_batch_hard(xr, LABELS)
    assert torch.allclose(ap, torch.tensor(ref_ap), atol=1e-4)
    assert torch.allclose(an, torch.tensor(ref_an), atol=1e-4)


def test_triplet_margin_and_soft_margin_values():
    torch.manual_seed(2)
    x = torch.randn(len(LABELS), 8) * 0.3  # small spread so some triplets are active
    ref_ap, ref_an = ref_batch_hard(x, LABELS)
    n = len(LABELS)
    hinge = sum(max(0.0, ap - an + 0.3) for ap, an in zip(ref_ap, ref_an)) / n
    soft = sum(math.log1p(math.exp(ap - an)) for ap, an in zip(ref_ap, ref_an)) / n
    assert 0 < hinge  # the check below is not vacuous
    loss_m, _, _ = TripletLoss(margin=0.3)(x, torch.tensor(LABELS))
    loss_s, _, _ = TripletLoss(margin=None)(x, torch.tensor(LABELS))
    assert loss_m.item() == pytest.approx(hinge, abs=1e-4)
    assert loss_s.item() == pytest.approx(soft, abs=1e-4)


def test_triplet_gradient_flows_and_is_finite():
    torch.manual_seed(3)
    x = (torch.randn(len(LABELS), 8) * 0.3).requires_grad_()
    loss, _, _ = TripletLoss(margin=0.3)(x, torch.tensor(LABELS))
    loss.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- center
def test_center_loss_matches_reference_and_gradients():
    torch.manual_seed(4)
    crit = CenterLoss(num_classes=4, feat_dim=5)
    x = torch.randn(6, 5, requires_grad=True)
    y = torch.tensor([0, 1, 1, 3, 3, 3])
    loss = crit(x, y)
    c, xd = crit.centers.detach(), x.detach()
    ref = sum(float(((xd[i] - c[y[i]]) ** 2).sum()) for i in range(6)) / 6
    assert loss.item() == pytest.approx(ref, rel=1e-5)
    loss.backward()
    assert torch.allclose(x.grad, 2 * (x.detach() - c[y]) / 6, atol=1e-6)
    for j in range(4):
        expected = sum((-2 * (xd[i] - c[j]) / 6 for i in range(6) if y[i] == j), torch.zeros(5))
        assert torch.allclose(crit.centers.grad[j], expected, atol=1e-6)
    with pytest.raises(ValueError, match="width"):
        crit(torch.randn(2, 3), torch.tensor([0, 1]))


# ----------------------------------------------------------------------------- SupCon
def test_supcon_with_repeated_labels_matches_reference():
    torch.manual_seed(5)
    a = (torch.randn(6, 4) * 2).requires_grad_()
    b = (torch.randn(6, 4) * 2).requires_grad_()
    y = [3, 1, 3, 0, 1, 3]
    crit = SupConLoss()
    loss = crit(a, b, torch.tensor(y), torch.tensor(y))
    assert loss.item() == pytest.approx(ref_supcon(a.detach(), b.detach(), y, y), abs=1e-4)
    # asymmetric direction (text -> image) with different label sets
    yb = [1, 3, 3, 0, 2, 1]
    loss2 = crit(b, a, torch.tensor(yb), torch.tensor(y))
    # row with label 2 has no positive in a: it is left out of the mean
    rows_with_pos = torch.tensor([v in y for v in yb])
    ref2 = ref_supcon(b.detach()[rows_with_pos], a.detach(), [v for v in yb if v in y], y)
    assert loss2.item() == pytest.approx(ref2, abs=1e-4)
    (loss + loss2).backward()
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- SimCLR
def test_simclr_matches_masked_nt_xent_reference_and_backprops():
    torch.manual_seed(6)
    a = torch.randn(5, 7, requires_grad=True)
    b = torch.randn(5, 7, requires_grad=True)
    loss = SimCLRLoss(temperature=0.1)({"aug1_embed": a, "aug2_embed": b})
    assert loss.item() == pytest.approx(ref_simclr(a.detach(), b.detach(), 0.1), abs=1e-4)
    loss.backward()
    for g in (a.grad, b.grad):
        assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_simclr_self_similarity_is_masked():
    # If a_i . a_i (= 1/T after normalisation, the largest logit) were not masked, the
    # loss for identical views would be log(2) + ...; with masking and orthogonal rows
    # the positive dominates: loss = -log(e^{1/T} / (e^{1/T} + (2N-2) e^0)).
    n, t = 4, 0.1
    a = torch.eye(n, 6)
    loss = SimCLRLoss(temperature=t)({"aug1_embed": a, "aug2_embed": a.clone()})
    expected = -math.log(math.exp(1 / t) / (math.exp(1 / t) + (2 * n - 2)))
    assert loss.item() == pytest.approx(expected, abs=1e-5)


def _simclr_views(world: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.randn(world * n, 5, generator=g), torch.randn(world * n, 5, generator=g)


def _simclr_ddp_worker(rank: int, world: int, n: int) -> dict[str, torch.Tensor]:
    # The inputs are rebuilt from a seed here rather than sent through spawn's shared memory.
    a, b = _simclr_views(world, n)
    la = a[rank * n:(rank + 1) * n].clone().requires_grad_()
    lb = b[rank * n:(rank + 1) * n].clone().requires_grad_()
    loss = SimCLRLoss(temperature=0.1)({"aug1_embed": la, "aug2_embed": lb})
    loss.backward()
    return {"loss": loss.detach(), "ga": la.grad, "gb": lb.grad}


@pytest.mark.slow
def test_simclr_under_ddp_matches_single_process(tmp_path):
    world, n = 2, 3
    a, b = _simclr_views(world, n)
    res = run_gloo(_simclr_ddp_worker, (n,), tmp_path, world)

    fa, fb = a.clone().requires_grad_(), b.clone().requires_grad_()
    full = SimCLRLoss(temperature=0.1)({"aug1_embed": fa, "aug2_embed": fb})
    full.backward()
    # Each rank's loss averages its own rows over all ranks' negatives: the mean over
    # ranks is the full-batch loss.
    assert torch.stack([r["loss"] for r in res]).mean().item() == pytest.approx(full.item(), abs=1e-5)
    # Gradients of other ranks' losses flow back through the gather, so each rank's
    # input gradient is d(sum of rank losses)/dx = world * d(full loss)/dx; DDP's
    # gradient averaging then yields exactly the full-batch parameter gradient.
    for r, out in enumerate(res):
        sl = slice(r * n, (r + 1) * n)
        assert torch.allclose(out["ga"], world * fa.grad[sl], atol=1e-5)
        assert torch.allclose(out["gb"], world * fb.grad[sl], atol=1e-5)


# ----------------------------------------------------------------------------- SimSiam
def test_simsiam_value_and_stop_gradient():
    torch.manual_seed(8)
    z1 = torch.randn(4, 6, requires_grad=True)
    z2 = torch.randn(4, 6, requires_grad=True)
    w1, w2 = torch.randn(6, 6), torch.randn(6, 6)
    p1, p2 = z1 @ w1, z2 @ w2  # predictor outputs depend on z
    p1.retain_grad()
    p2.retain_grad()
    loss = SimSiamLoss()(p1, p2, z1, z2)

    def cos(u, v):
        return float(u @ v) / (float(u.norm()) * float(v.norm()))

    p1d, p2d, z1d, z2d = p1.detach(), p2.detach(), z1.detach(), z2.detach()
    ref = -(sum(cos(p1d[i], z2d[i]) for i in range(4)) / 4 + sum(cos(p2d[i], z1d[i]) for i in range(4)) / 4) / 2
    assert loss.item() == pytest.approx(ref, abs=1e-5)
    loss.backward()
    # z receives gradient only through its own predictor branch, none through the target.
    assert torch.allclose(z1.grad, p1.grad @ w1.t(), atol=1e-6)
    assert torch.allclose(z2.grad, p2.grad @ w2.t(), atol=1e-6)
    # with z as pure targets (leaf p), z gets no gradient at all
    q1, q2 = p1.detach().requires_grad_(), p2.detach().requires_grad_()
    t1, t2 = z1.detach().requires_grad_(), z2.detach().requires_grad_()
    SimSiamLoss()(q1, q2, t1, t2).backward()
    assert t1.grad is None and t2.grad is None and q1.grad is not None


def test_make_ssl_loss_by_type():
    assert isinstance(make_ssl_loss(_cfg("MODEL.SSL_TYPE", "SIMCLR", "MODEL.SSL_TEMPERATURE", "0.2")), SimCLRLoss)
    assert make_ssl_loss(_cfg("MODEL.SSL_TYPE", "SIMCLR", "MODEL.SSL_TEMPERATURE", "0.2")).temperature == 0.2
    assert isinstance(make_ssl_loss(_cfg("MODEL.SSL_TYPE", "SIMSIAM")), SimSiamLoss)


# ----------------------------------------------------------------------------- make_loss
def _stage2_batch(seed: int = 9):
    torch.manual_seed(seed)
    c = 4
    target = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    scores = [torch.randn(8, c, requires_grad=True) for _ in range(2)]
    feats = [(torch.randn(8, d) * 0.3).requires_grad_() for d in (6, 5, 3)]
    i2t = torch.randn(8, c, requires_grad=True)
    return c, target, scores, feats, i2t


def test_make_loss_parts_match_references():
    c, target, scores, feats, i2t = _stage2_batch()
    loss_func, center = make_loss(_cfg("MODEL.ID_LOSS_WEIGHT", "0.25", "SOLVER.MARGIN", "0.3"), c)
    assert center is None
    total, parts = loss_func(scores, feats, target, i2tscore=i2t)
    ref_id = sum(ref_label_smooth_ce(s.detach(), target) for s in scores)
    ref_tri = 0.0
    for f in feats:
        ap, an = ref_batch_hard(f.detach(), target.tolist())
        ref_tri += sum(max(0.0, p - q + 0.3) for p, q in zip(ap, an)) / len(ap)
    ref_i2t = ref_label_smooth_ce(i2t.detach(), target)
    assert parts["id"].item() == pytest.approx(ref_id, abs=1e-4)
    assert parts["tri"].item() == pytest.approx(ref_tri, abs=1e-4)
    assert parts["i2t"].item() == pytest.approx(ref_i2t, abs=1e-4)
    assert total.item() == pytest.approx(0.25 * ref_id + ref_tri + ref_i2t, abs=1e-4)
    assert all(not p.requires_grad for p in parts.values())
    total.backward()
    for t in scores + feats + [i2t]:
        assert t.grad is not None and t.grad.abs().sum() > 0


def test_make_loss_weights_change_total_by_exact_amount():
    c, target, scores, feats, i2t = _stage2_batch()
    base = ["MODEL.ID_LOSS_WEIGHT", "1.0", "MODEL.TRIPLET_LOSS_WEIGHT", "1.0", "MODEL.I2T_LOSS_WEIGHT", "1.0"]
    t0, parts = make_loss(_cfg(*base), c)[0](scores, feats, target, i2tscore=i2t)
    for key, part, w in (("MODEL.ID_LOSS_WEIGHT", "id", 0.25),
                         ("MODEL.TRIPLET_LOSS_WEIGHT", "tri", 3.0),
                         ("MODEL.I2T_LOSS_WEIGHT", "i2t", 0.5)):
        t1, _ = make_loss(_cfg(*base, key, str(w)), c)[0](scores, feats, target, i2tscore=i2t)
        assert (t1 - t0).item() == pytest.approx((w - 1.0) * parts[part].item(), abs=1e-5)
    t_no_i2t, parts2 = make_loss(_cfg(*base), c)[0](scores, feats, target)
    assert "i2t" not in parts2
    assert (t0 - t_no_i2t).item() == pytest.approx(parts["i2t"].item(), abs=1e-5)


def test_make_loss_plain_ce_soft_margin_and_single_tensors():
    c, target, scores, feats, _ = _stage2_batch()
    cfg = _cfg("MODEL.IF_LABELSMOOTH", "off", "MODEL.NO_MARGIN", "True")
    total, parts = make_loss(cfg, c)[0](scores[0], feats[0], target)
    ref_ce = F.nll_loss(F.log_softmax(scores[0].detach(), 1), target).item()
    ap, an = ref_batch_hard(feats[0].detach(), target.tolist())
    ref_soft = sum(math.log1p(math.exp(p - q)) for p, q in zip(ap, an)) / len(ap)
    assert parts["id"].item() == pytest.approx(ref_ce, abs=1e-5)
    assert parts["tri"].item() == pytest.approx(ref_soft, abs=1e-4)


def test_make_loss_triplet_center_uses_first_feature():
    c, target, scores, feats, _ = _stage2_batch()
    with pytest.raises(ValueError, match="feat_dim"):
        make_loss(_cfg("MODEL.METRIC_LOSS_TYPE", "triplet_center"), c)
    cfg = _cfg("MODEL.METRIC_LOSS_TYPE", "triplet_center", "SOLVER.STAGE2.CENTER_LOSS_WEIGHT", "0.01")
    loss_func, center = make_loss(cfg, c, feat_dim=6)
    assert isinstance(center, CenterLoss)
    total, parts = loss_func(scores, feats, target)
    cen, f0 = center.centers.detach(), feats[0].detach()
    ref_center = sum(float(((f0[i] - cen[target[i]]) ** 2).sum()) for i in range(8)) / 8
    assert parts["center"].item() == pytest.approx(ref_center, rel=1e-5)
    assert total.item() == pytest.approx(parts["id"].item() + parts["tri"].item() + 0.01 * ref_center, rel=1e-5)
    total.backward()
    assert center.centers.grad is not None and center.centers.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- AMP
def test_losses_compute_in_float32_under_autocast():
    """Under autocast the matmuls would run in bfloat16 (~1e-2 error) unless disabled."""
    torch.manual_seed(10)
    x = torch.randn(len(LABELS), 16) * 3
    a, b = torch.randn(8, 16) * 3, torch.randn(8, 16) * 3
    y = torch.tensor([0, 1, 0, 2, 1, 2, 3, 3])
    calls = {
        "triplet": lambda: TripletLoss(0.3)(x, torch.tensor(LABELS))[1],
        "supcon": lambda: SupConLoss()(a, b, y, y),
        "simclr": lambda: SimCLRLoss(0.1)({"aug1_embed": a, "aug2_embed": b}),
    }
    for name, fn in calls.items():
        ref = fn()
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            got = fn()
        assert got.dtype == torch.float32, name
        assert torch.allclose(got, ref, atol=1e-5, rtol=1e-6), name
