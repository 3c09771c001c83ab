"""Evaluation metrics on known cases; the evaluator network trains, saves and loads; image scoring."""

import math

import numpy as np
import pytest
import torch

from bonsai.data import EmojiDataset
from bonsai.eval import Evaluator, EvaluatorConfig, evaluate_images, load_evaluator, save_evaluator
from bonsai.eval.metrics import frechet_distance, frechet_distance_from_stats, psnr, retrieval_ranks, retrieval_topk, ssim
from bonsai.eval.train_evaluator import train_evaluator


def _random_spd(d: int, g: torch.Generator) -> torch.Tensor:
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    return a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)


def test_frechet_closed_form_diagonal():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(6, generator=g, dtype=torch.float64) + 0.5, torch.rand(6, generator=g, dtype=torch.float64) + 0.5
    mu_a, mu_b = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    # commuting covariances Q diag(a) Q^T, Q diag(b) Q^T: FD = |dmu|^2 + sum (sqrt a - sqrt b)^2
    want = float((mu_a - mu_b).square().sum() + (a.sqrt() - b.sqrt()).square().sum())
    got = frechet_distance_from_stats(mu_a, q @ torch.diag(a) @ q.T, mu_b, q @ torch.diag(b) @ q.T)
    assert got == pytest.approx(want, rel=1e-10)


def test_frechet_general_covariances_match_eigenvalues_of_the_product():
    g = torch.Generator().manual_seed(1)
    ca, cb = _random_spd(8, g), _random_spd(8, g)
    mu = torch.randn(8, generator=g, dtype=torch.float64)
    # tr sqrt(A B) = sum of sqrt of the (real, positive) eigenvalues of A B: an independent route
    ev = np.linalg.eigvals((ca @ cb).numpy())
    want = float(mu.square().sum() + ca.trace() + cb.trace()) - 2 * float(np.sqrt(ev.real).sum())
    assert frechet_distance_from_stats(mu, ca, torch.zeros(8, dtype=torch.float64), cb) == pytest.approx(want, rel=1e-9)
    assert frechet_distance_from_stats(mu, ca, mu, ca) == pytest.approx(0.0, abs=1e-9)


def test_frechet_from_samples_approaches_the_population_value():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(20000, 4, generator=g, dtype=torch.float64)
    y = torch.randn(20000, 4, generator=g, dtype=torch.float64) * 2 + torch.tensor([1.0, 0, 0, 0], dtype=torch.float64)
    # N(0, I) vs N(e1, 4 I): 1 + 4 * (1 - 2)^2 = 5
    assert frechet_distance(x, y) == pytest.approx(5.0, abs=0.15)
    with pytest.raises(ValueError, match="widths"):
        frechet_distance(x, y[:, :3])


def test_retrieval_ranks_and_topk():
    g = torch.Generator().manual_seed(3)
    text = torch.nn.functional.normalize(torch.randn(10, 16, generator=g), dim=-1)
    assert retrieval_topk(text + 0.01 * torch.randn(10, 16, generator=g), text) == {1: 1.0, 5: 1.0}
    # image i looks exactly like caption i+1: its own caption is never first
    shifted = text.roll(-1, 0)
    assert retrieval_topk(shifted, text, k=(1,))[1] == 0.0
    # hand-made 1-d case: scores of image 0 against captions are [0.5, 1, -1] -> rank 1
    img = torch.tensor([[1.0, 0.0]])
    caps = torch.tensor([[0.5, math.sqrt(0.75)], [1.0, 0.0], [-1.0, 0.0]])
    assert retrieval_ranks(img, caps, torch.tensor([0])).tolist() == [1]
    assert retrieval_topk(img, caps, k=(1, 2), targets=torch.tensor([0])) == {1: 0.0, 2: 1.0}


def test_psnr():
    a = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    assert torch.isinf(psnr(a, a)).all()
    b = a + 0.1
    assert psnr(a, b).tolist() == pytest.approx([20.0, 20.0], abs=1e-9)
    assert psnr(a * 2, b * 2, data_range=2.0).tolist() == pytest.approx([20.0, 20.0], abs=1e-9)


def test_ssim_known_cases():
    a = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    assert ssim(a, a).tolist() == pytest.approx([1.0, 1.0], abs=1e-12)
    # constant images x and y: sigma terms vanish, SSIM = (2xy + C1) / (x^2 + y^2 + C1)
    x, y, c1 = 0.3, 0.7, 0.01**2
    got = ssim(torch.full((1, 1, 16, 16), x), torch.full((1, 1, 16, 16), y))
    assert got.item() == pytest.approx((2 * x * y + c1) / (x * x + y * y + c1), rel=1e-6)
    noisy = (a + 0.2 * torch.randn(a.shape, generator=torch.Generator().manual_seed(5))).clamp(0, 1)
    s = ssim(a, noisy)
    assert ((s > 0) & (s < 0.9)).all() and torch.allclose(s, ssim(noisy, a))
    with pytest.raises(ValueError, match="window"):
        ssim(a[..., :8, :8], a[..., :8, :8])


def _random_dataset(n: int, seed: int) -> EmojiDataset:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(n, 32, dtype=torch.bool)
    mask[:, :6] = True
    states = torch.randn(n, 32, 384, generator=g).half() * mask.unsqueeze(-1)
    return EmojiDataset(
        images=torch.rand(n, 3, 64, 64, generator=g) * 2 - 1, states=states, mask=mask,
        captions=[f"caption {i}" for i in range(n)], styles=["noto"] * n, splits=["train"] * n,
    )


TINY = EvaluatorConfig(widths=(8, 16), groups=4)


@pytest.fixture
def one_thread():
    """Tiny convolutions run faster on one thread, also on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_tiny_evaluator_trains_and_round_trips(tmp_path, one_thread):
    ds = _random_dataset(16, seed=6)
    model, losses = train_evaluator(ds, steps=30, batch_size=16, lr=1e-2, config=TINY, max_shift=0, log=None)
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    x = ds.images[:4]
    feats, emb = model.encode(x)
    assert feats.shape == (4, 16) and emb.shape == (4, 384)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(4), atol=1e-5)
    save_evaluator(model, tmp_path / "ev", dtype=torch.float32)
    loaded = load_evaluator(tmp_path / "ev")
    assert loaded.config == TINY
    assert torch.equal(loaded.encode(x)[1], emb)
    save_evaluator(model, tmp_path / "ev16")
    assert (loaded.encode(x)[1] - load_evaluator(tmp_path / "ev16").encode(x)[1]).abs().max() < 0.02


def test_load_evaluator_rejects_mismatched_weights(tmp_path):
    save_evaluator(Evaluator(TINY), tmp_path / "ev")
    cfg = (tmp_path / "ev" / "evaluator.json")
    cfg.write_text(cfg.read_text().replace("16", "24"))
    with pytest.raises(ValueError, match=r"proj.weight .* expected floating \(384, 24\)"):
        load_evaluator(tmp_path / "ev")


class _FakeText:
    def embed(self, prompts):
        return torch.nn.functional.normalize(
            torch.stack([torch.randn(384, generator=torch.Generator().manual_seed(len(p) * 31 + ord(p[-1]))) for p in prompts]),
            dim=-1,
        )


def test_evaluate_images_keys_and_ranges(one_thread):
    g = torch.Generator().manual_seed(7)
    images = torch.rand(12, 3, 64, 64, generator=g) * 2 - 1
    teacher = (images + 0.1 * torch.randn(images.shape, generator=g)).clamp(-1, 1)
    reference = torch.rand(20, 3, 64, 64, generator=g) * 2 - 1
    captions = [f"emoji {i % 6}" for i in range(12)]
    out = evaluate_images(images, captions, Evaluator(TINY).eval(), _FakeText(), reference, teacher)
    assert set(out) == {"top1", "top5", "chance_top1", "chance_top5", "num_images", "num_candidates", "fd", "psnr", "ssim"}
    assert 0 <= out["top1"] <= out["top5"] <= 1 and out["num_candidates"] == 6
    assert out["chance_top1"] == pytest.approx(1 / 6) and out["chance_top5"] == pytest.approx(5 / 6)
    assert out["fd"] >= 0 and 15 < out["psnr"] < 40 and 0 < out["ssim"] < 1
    same = evaluate_images(images, captions, Evaluator(TINY).eval(), _FakeText(), images, images)
    assert same["fd"] == pytest.approx(0, abs=1e-6) and same["ssim"] == pytest.approx(1.0) and math.isinf(same["psnr"])
    with pytest.raises(ValueError, match="captions"):
        evaluate_images(images, captions[:3], Evaluator(TINY), _FakeText())
