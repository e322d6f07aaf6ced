"""Tests of common.py: data pipeline, timestep mixture, losses. Everything runs for real on CPU, offline;
the expected numbers are the paper's (section 3.2's mixture, section 3.3's losses)."""
import io
import itertools
import math
import multiprocessing
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import common
from conftest import COLOURS, ROOT, encode, good_samples, random_image, write_shard


# ------------------------------------------------------------------------------------------------------
# timesteps: start-index distribution, phases
# ------------------------------------------------------------------------------------------------------

def test_start_index_probs_warmup_reference_values():
    p = common.start_index_probs(32, common.MODE_PROBS[0])
    assert p.shape == (32,) and math.isclose(float(p.sum()), 1.0, abs_tol=1e-12)
    for i in (16, 24):
        assert round(float(p[i]), 4) == 0.3933
    for i in (15, 17, 23, 25):
        assert round(float(p[i]), 4) == 0.0532
    # the modes at 0 and K/4 carry no weight in the warm-up
    assert float(p[:12].sum()) < 1e-6
    assert int(p.argmax()) in (16, 24)


def test_start_index_probs_phase3_reference_values():
    p = common.start_index_probs(32, common.MODE_PROBS[3])
    assert round(float(p[0]), 4) == 0.3287
    for i in (8, 16, 24):
        assert round(float(p[i]), 4) == 0.1643
    assert math.isclose(float(p.sum()), 1.0, abs_tol=1e-12)


@pytest.mark.parametrize("phase", range(4))
def test_start_index_probs_mixture_normalised_and_peaked_at_modes(phase):
    pi = common.MODE_PROBS[phase]
    p = common.start_index_probs(32, pi)
    assert math.isclose(float(p.sum()), 1.0, abs_tol=1e-12) and bool((p >= 0).all())
    for j, w in enumerate(pi):
        if w > 0:  # every mode with weight is a local maximum at j * K / 4
            loc = j * 8
            assert p[loc] > p[loc + 1] and (loc == 0 or p[loc] > p[loc - 1])


def test_trailing_dpm_grid_puts_modes_on_4_step_timesteps():
    from diffusers import DPMSolverMultistepScheduler
    sched = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                        timestep_spacing="trailing", final_sigmas_type="zero")
    sched.set_timesteps(32)
    assert sched.timesteps[[0, 8, 16, 24]].tolist() == [999, 749, 499, 249]


def test_start_index_probs_alternatives():
    K = 32
    u = common.start_index_probs(K, kind="uniform")
    assert torch.allclose(u, torch.full((K,), 1 / K, dtype=u.dtype)) and math.isclose(float(u.sum()), 1.0)
    g = common.start_index_probs(K, kind="gaussian")
    assert int(g.argmax()) == K // 2 and math.isclose(float(g.sum()), 1.0)
    i = torch.arange(K, dtype=torch.float64)
    ref = torch.exp(-(i - K / 2) ** 2 / K)
    assert torch.allclose(g, ref / ref.sum())
    with pytest.raises(ValueError):
        common.start_index_probs(K, kind="laplace")


@pytest.mark.parametrize("phase", [0, 3])
def test_sample_start_index_frequencies_match_probs(phase):
    p = common.start_index_probs(32, common.MODE_PROBS[phase])
    gen = torch.Generator().manual_seed(0)
    n = 20000
    draws = [common.sample_start_index(p, generator=gen) for _ in range(n)]
    assert all(isinstance(d, int) for d in draws[:10])
    freq = torch.bincount(torch.tensor(draws), minlength=32).double() / n
    assert freq.shape == (32,)
    assert torch.allclose(freq, p, atol=0.015)  # std of a frequency near 0.39 is ~0.0035
    assert float(freq[p < 1e-9].sum()) == 0.0  # indices with no mass are never drawn


@pytest.mark.parametrize("step,phase", [(0, 0), (2, 0), (3, 1), (5, 1), (6, 2), (8, 2), (9, 3), (11, 3), (100, 3)])
def test_phase_of_boundaries(step, phase):
    assert common.phase_of(step, [3, 3, 3, 3]) == phase


@pytest.mark.parametrize("step,phase", [(0, 1), (1, 1), (2, 3), (3, 3), (50, 3)])
def test_phase_of_skips_zero_length_phases(step, phase):
    assert common.phase_of(step, [0, 2, 0, 2]) == phase


# ------------------------------------------------------------------------------------------------------
# losses and scalings
# ------------------------------------------------------------------------------------------------------

def test_lcm_boundary_scalings():
    c_skip, c_out = common.lcm_boundary(torch.tensor([0.0, 999.0], dtype=torch.float64))
    assert c_skip[0] == 1.0 and c_out[0] == 0.0
    assert math.isclose(float(c_skip[1]), 0.25 / (9990 ** 2 + 0.25), rel_tol=1e-12)
    assert math.isclose(float(c_out[1]), 9990 / math.sqrt(9990 ** 2 + 0.25), rel_tol=1e-12)
    # plain floats work too
    assert common.lcm_boundary(0) == (1.0, 0.0)


def _dmd_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (2, 4, 8, 8)
    x_hat = torch.randn(shape, generator=g).requires_grad_(True)
    y, e_real, e_fake = (torch.randn(shape, generator=g) for _ in range(3))
    abar = torch.rand(2, generator=g) * 0.8 + 0.1
    return x_hat, y, e_real, e_fake, abar


def test_dmd_loss_gradient_is_weighted_x0_difference():
    x_hat, y, e_real, e_fake, abar = _dmd_inputs()
    loss = common.dmd_loss(x_hat, y, e_real, e_fake, abar)
    loss.backward()
    a = abar.view(-1, 1, 1, 1)
    coeff = (e_real - e_fake) * (1 - a).sqrt() / a.sqrt()
    x0_real = (y - (1 - a).sqrt() * e_real) / a.sqrt()
    x0_fake = (y - (1 - a).sqrt() * e_fake) / a.sqrt()
    assert torch.allclose(coeff, x0_fake - x0_real, atol=1e-5)
    wgt = 1 / ((x_hat.detach() - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True) + 1e-5)
    expected = 2 / x_hat.numel() * wgt * coeff
    assert torch.allclose(x_hat.grad, expected, rtol=1e-4, atol=1e-9)
    assert torch.allclose(loss.detach(), ((wgt * coeff) ** 2).mean(), rtol=1e-5)
    # sign: gradient descent moves x_hat by a positive multiple of x0_real - x0_fake
    assert float((x_hat.grad * (x0_fake - x0_real)).sum()) > 0


def test_dmd_loss_zero_gradient_when_scores_agree():
    x_hat, y, e_real, _, abar = _dmd_inputs(1)
    loss = common.dmd_loss(x_hat, y, e_real, e_real.clone(), abar)
    loss.backward()
    assert float(loss.detach()) == 0.0 and bool((x_hat.grad == 0).all())


LOGITS_REAL = torch.tensor([[1.5, -0.5], [0.25, 2.0]])
LOGITS_FAKE = torch.tensor([[-2.0, 0.5], [1.5, 0.0]])
sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
softplus = lambda v: math.log1p(math.exp(v))  # noqa: E731
mean = lambda vs: sum(vs) / len(vs)  # noqa: E731
R, FK = LOGITS_REAL.flatten().tolist(), LOGITS_FAKE.flatten().tolist()
GAN_EXPECTED = {
    "lsgan": (mean([(sig(f) - 1) ** 2 for f in FK]),
              0.5 * (mean([(sig(r) - 1) ** 2 for r in R]) + mean([sig(f) ** 2 for f in FK]))),
    "hinge": (-mean(FK), mean([max(0.0, 1 - r) for r in R]) + mean([max(0.0, 1 + f) for f in FK])),
    "non_saturating": (mean([softplus(-f) for f in FK]),
                       mean([softplus(-r) for r in R]) + mean([softplus(f) for f in FK])),
}


@pytest.mark.parametrize("kind", sorted(GAN_EXPECTED))
def test_gan_losses_match_hand_computed(kind):
    g_exp, d_exp = GAN_EXPECTED[kind]
    assert math.isclose(float(common.gan_g_loss(LOGITS_FAKE, kind)), g_exp, rel_tol=1e-6)
    assert math.isclose(float(common.gan_d_loss(LOGITS_REAL, LOGITS_FAKE, kind)), d_exp, rel_tol=1e-6)


def test_gan_lsgan_is_default_and_unknown_kind_raises():
    assert math.isclose(float(common.gan_g_loss(LOGITS_FAKE)), GAN_EXPECTED["lsgan"][0], rel_tol=1e-6)
    with pytest.raises(ValueError):
        common.gan_g_loss(LOGITS_FAKE, "wgan")
    with pytest.raises(ValueError):
        common.gan_d_loss(LOGITS_REAL, LOGITS_FAKE, "wgan")


def test_renoise_per_sample_levels():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    abar = torch.linspace(0.999, 0.01, 1000)
    t = torch.tensor([0, 500, 999])
    out = common.renoise(x0, noise, t, abar)
    for b, tb in enumerate(t.tolist()):
        a = abar[tb]
        assert torch.allclose(out[b], a.sqrt() * x0[b] + (1 - a).sqrt() * noise[b], atol=1e-6)


def test_center_crop_latents():
    z = torch.randn(4, 100, 90)
    h0, w0 = (100 - 64) // 2, (90 - 64) // 2
    assert torch.equal(common.center_crop_latents(z), z[:, h0:h0 + 64, w0:w0 + 64])
    zb = torch.randn(2, 4, 100, 90)
    assert torch.equal(common.center_crop_latents(zb), zb[..., h0:h0 + 64, w0:w0 + 64])
    small = torch.randn(2, 4, 8, 8)
    assert torch.equal(common.center_crop_latents(small), small)


@pytest.mark.parametrize("kind,ref", [("l2", F.mse_loss), ("l1", F.l1_loss)])
def test_distill_loss_latent_kinds(kind, ref):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    val = common.distill_loss(a, b, kind)
    assert float(val) > 0 and torch.allclose(val, ref(a, b))
    assert float(common.distill_loss(a, a.clone(), kind)) == 0.0


def test_distill_loss_unknown_kind_raises():
    with pytest.raises(ValueError):
        common.distill_loss(torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 8), "ssim")


@pytest.fixture(scope="module")
def lpips_vgg():
    import lpips
    torch.manual_seed(0)
    return lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval()


def _toy_decode(z):
    return F.interpolate(z[:, :3], scale_factor=2, mode="nearest")


def test_distill_loss_lpips(lpips_vgg):
    g = torch.Generator().manual_seed(0)
    x_T = (0.5 * torch.randn(2, 4, 16, 16, generator=g)).requires_grad_(True)
    same = x_T.detach().clone().requires_grad_(True)
    assert float(common.distill_loss(same, x_T, "lpips", _toy_decode, lpips_vgg).detach()) == 0.0
    x_hat = (0.5 * torch.randn(2, 4, 16, 16, generator=g)).requires_grad_(True)
    loss = common.distill_loss(x_hat, x_T, "lpips", _toy_decode, lpips_vgg)
    assert loss.ndim == 0 and float(loss.detach()) > 0
    loss.backward()
    assert x_hat.grad is not None and float(x_hat.grad.abs().sum()) > 0
    assert x_T.grad is None  # the teacher target is decoded without grad


def test_distill_loss_lpips_sees_only_the_centre_crop(lpips_vgg):
    g = torch.Generator().manual_seed(1)
    x_hat = 0.5 * torch.randn(1, 4, 70, 70, generator=g)
    x_T = x_hat.clone()
    x_T[..., :3, :] += 1.0  # outside the centre 64x64 crop (rows 3..66)
    x_T[..., :, -3:] -= 1.0
    assert common.distill_loss(x_hat, x_T, "lpips", _toy_decode, lpips_vgg).item() == 0.0
    x_T[..., 35, 35] += 1.0  # inside it
    assert common.distill_loss(x_hat, x_T, "lpips", _toy_decode, lpips_vgg).item() > 0


# ------------------------------------------------------------------------------------------------------
# data: image helpers
# ------------------------------------------------------------------------------------------------------

RED, BLUE = (220, 30, 30), (30, 60, 220)


@pytest.mark.parametrize("size", [(40, 20), (20, 40)])
def test_resize_center_crop_keeps_centre(size):
    w, h = size
    img = Image.new("RGB", size, BLUE)
    if w > h:  # long axis is x: the centre half (columns w/4..3w/4) is red
        img.paste(Image.new("RGB", (w // 2, h), RED), (w // 4, 0))
    else:
        img.paste(Image.new("RGB", (w, h // 2), RED), (0, h // 4))
    out = common.resize_center_crop(img, 16)
    assert out.size == (16, 16)
    arr = np.asarray(out).astype(int)
    inner = arr[2:14, 2:14]  # away from the bicubic blend at the red/blue border
    assert np.abs(inner - np.array(RED)).max() <= 3


def test_resize_center_crop_upscales_small_images():
    img = random_image(np.random.default_rng(0), size=6)  # 14 x 6
    out = common.resize_center_crop(img, 16)
    assert out.size == (16, 16)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_to_rgb_transparent_is_white(mode):
    img = Image.new("RGBA", (5, 4), (10, 20, 30, 0)).convert(mode)
    out = common.to_rgb(img)
    assert out.mode == "RGB" and out.size == (5, 4)
    assert (np.asarray(out) == 255).all()


def test_to_rgb_palette_transparency_and_opaque():
    p = Image.new("P", (4, 4), 0)
    p.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    p.putpixel((0, 0), 1)
    p.info["transparency"] = 0
    arr = np.asarray(common.to_rgb(p))
    assert tuple(arr[0, 0]) == (200, 10, 10) and tuple(arr[1, 1]) == (255, 255, 255)
    opaque = Image.new("RGBA", (3, 3), (10, 20, 30, 255))
    assert (np.asarray(common.to_rgb(opaque)) == (10, 20, 30)).all()


def test_to_rgb_16bit_grey_keeps_brightness():
    """16-bit grey PNGs open as mode I;16 (0..65535): a mid grey must stay mid grey, not saturate to white."""
    buf = io.BytesIO()
    Image.fromarray(np.full((6, 6), 30000, dtype=np.uint16)).save(buf, "PNG")
    img = Image.open(io.BytesIO(buf.getvalue()))
    img.load()
    arr = np.asarray(common.to_rgb(img)).astype(int)
    assert arr.shape == (6, 6, 3)
    assert np.abs(arr - round(30000 / 257)).max() <= 1


def test_image_to_tensor_range():
    img = Image.new("RGB", (3, 2), (0, 255, 0))
    t = common.image_to_tensor(img)
    assert t.shape == (3, 2, 3) and t.dtype == torch.float32
    assert bool((t[0] == -1).all()) and bool((t[1] == 1).all())


# ------------------------------------------------------------------------------------------------------
# data: the loader
# ------------------------------------------------------------------------------------------------------

def _loader(paths, min_aesthetic=None, num_workers=0, **kw):
    return common.make_loader([str(p) for p in paths], resolution=16, batch_size=2, num_workers=num_workers,
                              min_aesthetic=min_aesthetic, seed=0, **kw)


def _take(loader, n):
    return list(itertools.islice(iter(loader), n))


def _texts(batches):
    return [t for b in batches for t in b["text"]]


def _skipped(c):
    return c["bad_image"] + c["no_caption"] + c["filtered"] + c["bad_extra"]


def _yielded(c):
    """Samples the decoder let through when the last batch was collated: webdataset's `batched` collates
    batch n when sample 2n + 1 arrives, so after n batches of 2 this is exactly 2n + 1."""
    return c["read"] - _skipped(c)


def test_loader_batches_from_good_shards(shards):
    loader = _loader(shards)
    assert isinstance(loader, common.Loader)
    batches = _take(loader, 12)
    captions = {f"a {c} square s{k}-{i}" for k in range(2) for i, c in zip(range(16), list(COLOURS) * 16)}
    for b in batches:
        assert set(b) == {"pixel_values", "text"}
        pv = b["pixel_values"]
        assert pv.shape == (2, 3, 16, 16) and pv.dtype == torch.float32
        assert float(pv.min()) >= -1 and float(pv.max()) <= 1 and float(pv.std()) > 0.1
        assert isinstance(b["text"], list) and len(b["text"]) == 2
    texts = _texts(batches)
    assert set(texts) <= captions and len(set(texts)) > 8
    c = loader.counts
    assert _yielded(c) == 25 and c["bad_image"] == c["no_caption"] == c["filtered"] == 0
    assert c["tar_error"] == 0


def _img(mode, size, colour, fmt):
    return encode(Image.new(mode, size, colour), fmt)


def test_loader_decodes_every_image_mode_to_rgb(tmp_path):
    pal = Image.new("RGB", (20, 20), (200, 10, 10)).convert("P")
    specs = {  # caption: (key, bytes, expected constant RGB or None)
        "grey": ("png", _img("L", (20, 24), 100, "PNG"), (100, 100, 100)),
        "palette": ("png", encode(pal, "PNG"), None),
        "rgba": ("png", _img("RGBA", (24, 20), (10, 200, 30, 255), "PNG"), (10, 200, 30)),
        "cmyk": ("jpg", _img("CMYK", (20, 20), (0, 200, 200, 0), "JPEG"), None),
        "webp": ("webp", encode(random_image(np.random.default_rng(1), 20), "WEBP"), None),
        "tiny": ("png", _img("RGB", (8, 6), (40, 80, 160), "PNG"), (40, 80, 160)),
    }
    path = write_shard(tmp_path / "modes.tar", [{key: data, "json": {"caption": cap}}
                                                 for cap, (key, data, _) in specs.items()])
    loader, seen = _loader([path]), {}
    for b in itertools.islice(iter(loader), 60):
        for t, pv in zip(b["text"], b["pixel_values"]):
            seen[t] = pv
        if len(seen) == len(specs):
            break
    assert set(seen) == set(specs)
    for cap, (_, _, colour) in specs.items():
        pv = seen[cap]
        assert pv.shape == (3, 16, 16), cap
        assert float(pv.min()) >= -1 and float(pv.max()) <= 1
        if colour is not None:
            want = torch.tensor(colour, dtype=torch.float32).view(3, 1, 1) / 127.5 - 1
            assert torch.allclose(pv, want.expand_as(pv), atol=2 / 127.5), cap
    assert loader.counts["bad_image"] == 0


def _bad_samples(rng):
    """5 samples that must all be skipped: 3 bad images (counted bad_image), 2 without caption."""
    jpg = encode(random_image(rng))
    return [
        dict(jpg=rng.integers(0, 256, 500, dtype=np.uint8).tobytes(), json={"caption": "BAD corrupt"}),
        dict(jpg=jpg[: len(jpg) // 2], json={"caption": "BAD truncated"}),
        dict(json={"caption": "BAD no image"}),
        dict(jpg=encode(random_image(rng)), json={"title": "BAD no caption key"}),
        dict(jpg=encode(random_image(rng))),
    ]


def test_loader_skips_and_counts_bad_samples(tmp_path):
    rng = np.random.default_rng(0)
    good = good_samples(5, rng, tag="ok")
    good_caps = {s["json"]["caption"] for s in good}
    path = write_shard(tmp_path / "mixed.tar", good + _bad_samples(rng))
    loader = _loader([path])
    batches = _take(loader, 200)
    texts = _texts(batches)
    assert len(texts) == 400 and set(texts) == good_caps  # no bad sample ever comes out
    c = loader.counts
    assert _yielded(c) == 401  # each read sample is yielded or counted once
    # half of what is read is bad: 3/10 bad images, 2/10 without caption (shuffling only reorders)
    assert 0.4 < (c["bad_image"] + c["no_caption"]) / c["read"] < 0.6
    assert 0.2 < c["bad_image"] / c["read"] < 0.4 and 0.1 < c["no_caption"] / c["read"] < 0.3
    assert c["filtered"] == 0 and c["tar_error"] == 0


def test_loader_counts_exact_without_shuffle(tmp_path):
    """shuffle=1 keeps the tar order, so after each batch the counters are known exactly."""
    rng = np.random.default_rng(0)
    good, bad = good_samples(5, rng), _bad_samples(rng)
    # order per pass: g b g b g b g b g b (bad: corrupt, truncated, no image, no caption key, no json)
    samples = [s for pair in zip(good, bad) for s in pair]
    path = write_shard(tmp_path / "ordered.tar", samples)
    loader = _loader([path], shuffle=1)
    it = iter(loader)
    # 10 batches: 21 good samples decoded (see _yielded) = 4 whole passes (20 good) + 1 sample
    _ = list(itertools.islice(it, 10))
    c = loader.counts
    assert c["read"] == 41
    assert c["bad_image"] == 4 * 3 and c["no_caption"] == 4 * 2 and _yielded(c) == 21


def test_min_aesthetic_filters_low_scores(tmp_path):
    rng = np.random.default_rng(0)
    samples = good_samples(4, rng, tag="hi", score=7.0) + good_samples(4, rng, tag="LOW", score=5.0)
    path = write_shard(tmp_path / "aes.tar", samples)
    loader = _loader([path], min_aesthetic=6)
    texts = _texts(_take(loader, 40))
    assert texts and not any("LOW" in t for t in texts)
    c = loader.counts
    assert c["filtered"] > 0 and _yielded(c) == 81
    assert 0.35 < c["filtered"] / c["read"] < 0.65
    # the filter off (negative): the low-score samples load
    texts = _texts(_take(_loader([path], min_aesthetic=-1), 40))
    assert any("LOW" in t for t in texts) and any("hi" in t for t in texts)


def _no_score_shard(tmp_path):
    rng = np.random.default_rng(0)
    samples = [dict(jpg=encode(random_image(rng, 16)), json={"caption": f"no score {i}"}) for i in range(4)]
    return write_shard(tmp_path / "noscore.tar", samples)


def _first_batch_error(paths, timeout, **kw):
    """Ask a fresh loader for one batch in a forked child process; return (exception type name, message),
    or fail if the child does not stop within `timeout` s (it is killed, so a hang leaves no spinner)."""
    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)

    def child():
        try:
            _take(_loader(paths, **kw), 1)
            send.send((None, ""))
        except BaseException as e:  # noqa: BLE001
            send.send((type(e).__name__, str(e)))
    proc = ctx.Process(target=child, daemon=True)
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join()
        pytest.fail(f"the loader neither yielded a batch nor raised within {timeout} s")
    assert recv.poll(5), f"the child died without an answer (exit code {proc.exitcode})"
    return recv.recv()


def test_no_sample_passes_the_filter_raises(tmp_path):
    path = _no_score_shard(tmp_path)
    name, msg = _first_batch_error([path], 60, min_aesthetic=6)
    assert name == "RunError" and "--min_aesthetic" in msg
    assert "json keys seen: caption." in msg and "\n" not in msg
    # the same shard with the filter off loads
    texts = _texts(_take(_loader([path], min_aesthetic=-1), 3))
    assert len(texts) == 6 and all(t.startswith("no score") for t in texts)


def test_unreadable_shard_raises_instead_of_hanging(tmp_path):
    path = tmp_path / "junk.tar"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    name, msg = _first_batch_error([path], 60)
    assert name == "RunError" and "--shards" in msg


@pytest.mark.parametrize("kind", ["empty_tar", "no_sample_members"])
def test_shard_without_samples_raises_instead_of_hanging(tmp_path, kind):
    """A readable tar that holds no webdataset sample (an empty shard from a failed download job, or
    members without a key.ext name) must stop the loader with a --shards message, not spin forever."""
    path = tmp_path / f"{kind}.tar"
    with tarfile.open(path, "w") as tar:
        if kind == "no_sample_members":
            for n in ("README", "LICENSE"):
                info = tarfile.TarInfo(n)
                info.size = 2
                tar.addfile(info, io.BytesIO(b"hi"))
    name, msg = _first_batch_error([path], 10)
    assert name == "RunError" and "--shards" in msg


def _img2dataset_samples(n, rng, scores):
    """Samples laid out as img2dataset writes them: <key>.jpg, <key>.txt (the caption) and <key>.json (the
    caption again, the dataset's extra columns under their own names, url, status, sizes)."""
    out = []
    for i, score in zip(range(n), scores):
        caption = f"a {list(COLOURS)[i % 4]} photo {i}"
        out.append(dict(__key__=f"{i:09d}", jpg=encode(random_image(rng)), txt=caption.encode(),
                        json=dict(caption=caption, aesthetic=score, url=f"https://example.com/{i}.jpg",
                                  key=f"{i:09d}", status="success", width=48, height=40)))
    return out


def test_img2dataset_layout_with_its_aesthetic_column(tmp_path):
    rng = np.random.default_rng(3)
    scores = [7.5, "6.5", 5.0, float("nan"), "high", 8] * 2  # numbers written as strings are read
    path = write_shard(tmp_path / "laion.tar", _img2dataset_samples(12, rng, scores))
    loader = _loader([path], min_aesthetic=6, aesthetic_key="aesthetic")
    texts = set(_texts(_take(loader, 12)))
    kept = {f"a {list(COLOURS)[i % 4]} photo {i}" for i in range(12) if i % 6 in (0, 1, 5)}
    assert texts == kept  # 5.0, NaN and "high" fail the filter: no usable score counts as no score
    # under the default key nothing passes, and the message names the keys the samples carry
    name, msg = _first_batch_error([path], 60, min_aesthetic=6)
    assert name == "RunError"
    assert "json keys seen: aesthetic, caption, height, key, status, url, width" in msg
    assert "pass --aesthetic_key aesthetic or" in msg and "--min_aesthetic -1" in msg
    assert "Members seen: jpg, json, txt" in msg


def test_jpg_and_txt_shards_read_the_caption_from_the_txt(tmp_path):
    rng = np.random.default_rng(4)
    samples = [dict(jpg=encode(random_image(rng)), txt=f"cc3m caption {i}".encode()) for i in range(6)]
    samples += [dict(jpg=encode(random_image(rng)), txt=b"  ")]  # blank: no caption
    path = write_shard(tmp_path / "cc3m.tar", samples)
    loader = _loader([path], min_aesthetic=-1, shuffle=1)
    texts = _texts(_take(loader, 3))
    assert texts == [f"cc3m caption {i}" for i in range(6)]
    name, msg = _first_batch_error([path], 60, min_aesthetic=6)  # no score at all: the filter must be off
    assert name == "RunError" and "--min_aesthetic -1" in msg


def test_json_caption_wins_over_the_txt(tmp_path):
    rng = np.random.default_rng(5)
    path = write_shard(tmp_path / "both.tar", [dict(jpg=encode(random_image(rng)), txt=b"from txt",
                                                    json={"caption": "from json"}) for _ in range(4)])
    assert set(_texts(_take(_loader([path]), 2))) == {"from json"}


def test_large_jpegs_decode_at_reduced_size_close_to_a_full_decode():
    """draft() picks a 1/2 ... 1/8 JPEG scale that still covers the resolution; the crop barely changes."""
    rng = np.random.default_rng(6)
    small = rng.integers(0, 255, (30, 45, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((1800, 1200), Image.BICUBIC)  # smooth content, as photographs are
    data = encode(img)
    decoder = common.SampleDecoder(64)
    out = decoder.decode(dict(jpg=data, json=b'{"caption": "c"}'))["pixel_values"]
    with Image.open(io.BytesIO(data)) as full:
        full.load()
        ref = common.image_to_tensor(common.resize_center_crop(full.convert("RGB"), 64))
    with Image.open(io.BytesIO(data)) as drafted:
        drafted.draft(None, (64, 64))
        assert drafted.size == (1800 // 8, 1200 // 8)  # decoded at 1/8 scale, still >= 64 px
    assert out.shape == ref.shape == (3, 64, 64)
    assert (out - ref).abs().mean() < 0.02  # in [-1, 1] units: about 1 % of the range


def test_a_worker_stop_arrives_as_one_line(tmp_path):
    """With data workers, the no-usable-sample stop is re-raised in the trainer as the one-line cause, not
    inside DataLoader's traceback text. (A fresh process: DataLoader workers in a forked child can hang.)"""
    path = _no_score_shard(tmp_path)
    code = (f"import sys; sys.path.insert(0, {ROOT!r}); import common\n"
            f"loader = common.make_loader([{str(path)!r}], 16, 2, num_workers=1, min_aesthetic=6)\n"
            "try:\n    next(iter(loader))\nexcept common.RunError as e:\n    print(repr(str(e)))\nloader.close()")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    msg = eval(r.stdout.strip().splitlines()[-1])
    assert msg.startswith("no usable sample") and "\n" not in msg and "Traceback" not in msg
    assert "--min_aesthetic" in msg


# ------------------------------------------------------------------------------------------------------
# data: shard lists
# ------------------------------------------------------------------------------------------------------

def test_expand_shards(tmp_path):
    for i in range(3):
        (tmp_path / f"a-{i}.tar").write_bytes(b"")
    (tmp_path / "b-0.tar").write_bytes(b"")
    files = [str(tmp_path / f"a-{i}.tar") for i in range(3)]
    assert common.expand_shards([str(tmp_path / "a-{0..2}.tar")]) == files
    assert common.expand_shards([str(tmp_path / "a-*.tar")]) == files
    assert common.expand_shards([str(tmp_path / "*.tar")]) == files + [str(tmp_path / "b-0.tar")]
    assert common.expand_shards([str(tmp_path / "a-{0,2}.tar"), str(tmp_path / "b-0.tar")]) == \
        [files[0], files[2], str(tmp_path / "b-0.tar")]
    assert common.expand_shards(["pipe:cat x.tar"]) == ["pipe:cat x.tar"]
    for missing in ("nothing-*.tar", "a-{0..3}.tar"):
        with pytest.raises(ValueError, match="--shards"):
            common.expand_shards([str(tmp_path / missing)])


def test_shard_slice_disjoint_cover():
    urls = [f"u{i}" for i in range(8)]
    slices = [common.shard_slice(urls, r, 2, w, 2) for r in range(2) for w in range(2)]
    assert all(len(s) == 2 for s in slices)
    flat = [u for s in slices for u in s]
    assert sorted(flat) == sorted(urls) and len(set(flat)) == 8
    assert all(common.shard_slice(urls[:3], r, 2, w, 2) == urls[:3] for r in range(2) for w in range(2))


def test_resampled_slice_seeded():
    urls = [f"u{i}" for i in range(8)]

    def seq(seed):
        return [d["url"] for d in itertools.islice(iter(common.ResampledSlice(urls, seed)), 50)]
    a, b = seq(0), seq(1)
    assert a == seq(0) and a != b
    assert set(a) <= set(urls) and len(set(a)) > 4


def test_resampled_slice_uses_rank_slice():
    urls = [f"u{i}" for i in range(8)]
    got = {d["url"] for d in itertools.islice(iter(common.ResampledSlice(urls, 0, rank=1, world_size=2)), 100)}
    assert got == set(urls[1::2])
