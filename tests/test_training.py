"""simcore.isc.training: the ArcFace loop and drip training on tiny data."""
import pytest
import torch

from simcore.isc.training import SmallCNN, centres_from_embeddings, drip_train, embed, train_arcface


def tiny_images(n, g):
    return torch.rand(n, 3, 16, 16, generator=g)


def test_train_arcface_lowers_the_loss(generator):
    torch.manual_seed(0)
    x = tiny_images(12, generator)
    model = SmallCNN(16, widths=(8, 16), depth=1)
    w = torch.nn.Parameter(torch.nn.functional.normalize(torch.randn(12, 16, generator=generator), dim=1))
    stats = train_arcface(model, x, w, steps=60, batch_size=12, lr=1e-2, margin=0.2, scale=16.0,
                          generator=generator)
    assert stats.steps == 60 and stats.images == 720 and stats.images_per_second > 0
    first, last = sum(stats.losses[:5]) / 5, sum(stats.losses[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    e = embed(model, x)
    torch.testing.assert_close(e.norm(dim=1), torch.ones(12))


def test_centres_are_mean_embeddings_of_clean_and_augmented_copies(generator):
    model = SmallCNN(8, widths=(8,), depth=1)
    x = tiny_images(5, generator)
    flip = lambda t, generator=None: t.flip(3)          # noqa: E731  (a deterministic "augmentation")
    c = centres_from_embeddings(model, x, augment=flip, views=2)
    ref = torch.nn.functional.normalize(embed(model, x) + 2 * embed(model, x.flip(3)), dim=1)
    torch.testing.assert_close(c, ref)


def test_drip_training_grows_the_head_and_keeps_old_rows(generator, monkeypatch):
    import simcore.isc.training as T
    model = SmallCNN(8, widths=(8, 8), depth=1)
    x = tiny_images(20, generator)
    seen = []
    real = T.train_arcface

    params = []

    def spy(model_, images, weight, **kw):
        seen.append(weight.detach().clone())      # the rows as each stage starts
        params.append(weight)                     # the parameter, trained in place by that stage
        return real(model_, images, weight, **kw)

    monkeypatch.setattr(T, "train_arcface", spy)
    weight, stats = drip_train(model, x, stages=(0.25, 0.5, 1.0), steps=(3, 3, 3), batch_size=5,
                               generator=generator, scale=16.0, margin=0.2)
    assert [s.shape[0] for s in seen] == [5, 10, 20]
    assert weight.shape == (20, 8) and stats.steps == 9
    # Rows 0..4 entering stage 2 are the trained rows of stage 1 (kept, not re-initialised), and the
    # new rows 5..9 are the normalised embeddings of images 5..9 by the backbone at that moment.
    torch.testing.assert_close(seen[1][:5], params[0].detach())
    torch.testing.assert_close(seen[2][:10], params[1].detach())
    assert not torch.equal(seen[0], params[0].detach())          # stage 1 did train those rows
    assert seen[1][5:10].norm(dim=1).allclose(torch.ones(5))
    with pytest.raises(ValueError, match="stages"):
        drip_train(model, x, stages=(0.5, 0.4, 1.0), steps=(1, 1, 1))


def test_flip_symmetrised_embeddings_are_flip_invariant(generator):
    model = SmallCNN(8, widths=(8, 8), depth=1, input_size=12)
    x = tiny_images(4, generator)
    a, b = embed(model, x, flip=True), embed(model, x.flip(3), flip=True)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(embed(model, x), embed(model, x.flip(3)), atol=1e-4)


def test_training_is_reproducible_for_a_seed():
    """Same seeds (model init, data, the loop's generator): bit-identical weights and losses."""
    def once():
        torch.manual_seed(0)
        model = SmallCNN(16, widths=(8, 16), depth=1)
        w = torch.nn.Parameter(torch.nn.functional.normalize(torch.randn(12, 16), dim=1))
        x = torch.rand(12, 3, 16, 16, generator=torch.Generator().manual_seed(1))
        noisy = lambda t, generator=None: t + 0.1 * torch.randn(t.shape, generator=generator)   # noqa: E731
        stats = train_arcface(model, x, w, steps=6, batch_size=8, augment=noisy, margin=0.2, scale=16.0,
                              generator=torch.Generator().manual_seed(2))
        return [p.detach().clone() for p in model.parameters()] + [w.detach().clone()], stats.losses

    (a, la), (b, lb) = once(), once()
    assert la == lb
    assert all(torch.equal(p, q) for p, q in zip(a, b))
