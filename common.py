"""What every flash_*.py script shares: data loading, the timestep distribution and the losses.

Nothing here touches a model's call signature or a script's flags (functions take values, not `args`);
each script writes out its own run plumbing (processes, DDP, optimizers, checkpoints, signals, logging).
Sections, in the order a reader of the paper meets them:
  1. data: the webdataset pipeline (image + caption shards -> batches of pixel_values and text)
  2. timesteps: phase schedule and the Gaussian-mixture start-index distribution (paper section 3.2)
  3. losses: distillation, DMD, GAN, the LCM boundary scalings, re-noising (paper section 3.3)
"""
import glob
import io
import itertools
import json
import os
import signal
import weakref
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from braceexpand import braceexpand
from PIL import Image, ImageFile, ImageOps

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated jpg must fail to decode, so it is skipped and counted

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
MAX_FILTERED = 500  # samples read with none passing the filters before we stop and say why


class UsageError(ValueError):
    """A bad flag or input found at start-up; the message names the flag and the fix."""


class RunError(RuntimeError):
    """A run stopped for a cause the user can act on (no usable data, a failed checkpoint write, losses
    that stay non-finite); the message names the cause and the fix."""


# ------------------------------------------------------------------------------------------------------
# 1. data
# ------------------------------------------------------------------------------------------------------

def expand_shards(patterns):
    """Brace-expand (and, for local paths, glob) each pattern; raise a ValueError naming --shards if a
    local pattern matches no file. Remote (`pipe:`, `http(s):`, `s3:` ...) URLs are trusted as given."""
    urls = []
    for pattern in patterns:
        for url in braceexpand(pattern):
            if ":" in url.split("/")[0]:  # scheme such as pipe: or https:
                urls.append(url)
                continue
            found = sorted(glob.glob(os.path.expanduser(url)))
            if not found:
                raise UsageError(f"--shards: {url!r} (from {pattern!r}) matches no file; "
                                 "give tar shards such as 'data/{00000..00099}.tar'")
            urls += found
    return urls


def to_rgb(img):
    """Any PIL mode to RGB; transparent pixels become white rather than whatever colour they hide."""
    if img.mode.startswith("I;16"):  # 16-bit grey (PNG): 0..65535 -> 0..255, else convert() saturates
        img = Image.fromarray(np.round(np.asarray(img, dtype=np.float64) / 257).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img.convert("RGBA")).convert("RGB")
    return img.convert("RGB")


def resize_center_crop(img, size):
    """Resize the short side to `size` (up or down), then take the centre `size` x `size` square."""
    w, h = img.size
    s = size / min(w, h)
    w, h = max(size, round(w * s)), max(size, round(h * s))
    img = img.resize((w, h), Image.BICUBIC)
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def image_to_tensor(img):
    """RGB PIL image -> float tensor (3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1).contiguous()


def caption_of(sample, meta):
    """The caption: json `caption` if present (the released configs, img2dataset), else the `.txt` member
    (img2dataset, cc3m-style jpg + txt shards)."""
    caption = meta.get("caption")
    if caption is None and "txt" in sample:
        try:
            caption = sample["txt"].decode("utf-8")
        except (UnicodeDecodeError, AttributeError):
            return None
    return caption if isinstance(caption, str) and caption.strip() else None


def score_of(meta, key):
    """The aesthetic score under `key` as a finite float (numbers written as strings are read); None if
    missing, non-numeric, NaN or infinite."""
    try:
        score = float(meta.get(key))
    except (TypeError, ValueError):
        return None
    return score if np.isfinite(score) else None


class SampleDecoder:
    """webdataset stage: raw tar samples -> {pixel_values, text, **extra}; bad samples are skipped and
    counted. `extra(sample, img)` (img: the cropped RGB image) lets a script add fields, e.g. an edge map;
    it may raise ValueError to reject a sample. Counts travel with each batch (see `Loader`)."""

    def __init__(self, resolution, min_aesthetic=None, extra=None, aesthetic_key="aesthetic_score"):
        self.resolution, self.min_aesthetic, self.extra = resolution, min_aesthetic, extra
        self.aesthetic_key = aesthetic_key
        self.counts = dict(read=0, bad_image=0, no_caption=0, filtered=0, bad_extra=0)
        self.members, self.json_keys = set(), set()  # what the samples carry, for the message if none passes

    def __call__(self, src):
        kept = 0
        for sample in src:
            self.counts["read"] += 1
            out = self.decode(sample)
            if out is None and kept == 0 and self.counts["read"] >= MAX_FILTERED:
                raise RunError(self.nothing_passes())
            if out is not None:
                kept += 1
                yield out

    def decode(self, sample):
        key = next((k for k in IMAGE_KEYS if k in sample), None)
        try:
            meta = json.loads(sample["json"]) if "json" in sample else {}
            meta = meta if isinstance(meta, dict) else {}
        except (ValueError, UnicodeDecodeError, TypeError):
            meta = {}
        if len(self.members) < 100:
            self.members.update(k for k in sample if not k.startswith("__"))
            self.json_keys.update(list(meta)[:50])
        caption = caption_of(sample, meta)
        if caption is None:
            self.counts["no_caption"] += 1
            return None
        if self.min_aesthetic is not None:
            score = score_of(meta, self.aesthetic_key)
            if score is None or score < self.min_aesthetic:
                self.counts["filtered"] += 1
                return None
        if key is None:
            self.counts["bad_image"] += 1
            return None
        try:
            with Image.open(io.BytesIO(sample[key])) as img:
                # a large JPEG decodes at a reduced scale (1/2 ... 1/8) that still covers the resolution
                img.draft(None, (self.resolution, self.resolution))
                img.load()
                img = resize_center_crop(to_rgb(ImageOps.exif_transpose(img)), self.resolution)
        except Exception:  # PIL raises many types on corrupt data; any of them means "skip this sample"
            self.counts["bad_image"] += 1
            return None
        out = dict(pixel_values=image_to_tensor(img), text=caption)
        if self.extra is not None:
            try:
                out.update(self.extra(sample, img))
            except ValueError:
                self.counts["bad_extra"] += 1
                return None
        return out

    def nothing_passes(self):
        c = self.counts
        seen = (f" Members seen: {', '.join(sorted(self.members)) or 'none'}; json keys seen: "
                f"{', '.join(sorted(self.json_keys)) or 'none'}.")
        hint = ""
        if c["filtered"] >= c["read"] // 2:
            numeric = sorted(k for k in self.json_keys if k != self.aesthetic_key and "aesthetic" in k.lower())
            other = f"pass --aesthetic_key {numeric[0]} or " if numeric else ""
            hint = (f" {c['filtered']} failed the aesthetic filter (json {self.aesthetic_key!r} >= "
                    f"{self.min_aesthetic}, a missing or non-numeric score counts as failing): {other}lower "
                    "--min_aesthetic, or pass --min_aesthetic -1 to turn it off.")
        elif c["no_caption"] >= c["read"] // 2:
            hint = f" {c['no_caption']} had no caption (json 'caption' or a .txt member)."
        elif c["bad_image"] >= c["read"] // 2:
            hint = f" {c['bad_image']} had no readable jpg/jpeg/png/webp image."
        elif c["bad_extra"] >= c["read"] // 2:
            hint = (f" {c['bad_extra']} lacked the script's extra input (e.g. the edge map named by --edge_key "
                    "is missing or unreadable).")
        return f"no usable sample in the first {c['read']} read from --shards ({c}).{hint}{seen}"


class TarErrors:
    """webdataset handler: skip unreadable shards and tar members and count them; stop instead of
    spinning forever when nothing at all can be read (a resampled stream would never end)."""

    def __init__(self, decoder):
        self.decoder, self.count, self.samples = decoder, 0, 0

    def counted(self, src):
        """Pipeline stage right after tarfile_to_samples: count the samples the shards gave."""
        for sample in src:
            self.samples += 1
            yield sample

    def check_progress(self, shards_opened):
        """Called by ResampledSlice before each shard: readable tars that hold no sample never raise an
        error, so without this check a resampled stream of them would spin forever."""
        if self.samples == 0 and shards_opened >= 50:
            raise RunError(f"--shards: {shards_opened} shards opened and not one sample in them "
                               f"({self.count} read errors); give webdataset tars of <key>.jpg + <key>.json")

    def __call__(self, exn):
        self.count += 1
        if self.decoder.counts["read"] == 0 and self.count >= 50:
            raise RunError(f"--shards: {self.count} read errors and not one sample read (last: {exn}); check "
                           "that the shards are readable tar files and that a pipe: command runs on its own")
        return True


def collate(samples, decoder, tar_errors):
    batch = {k: [s[k] for s in samples] for k in samples[0]}
    batch = {k: torch.stack(v) if torch.is_tensor(v[0]) else v for k, v in batch.items()}
    info = torch.utils.data.get_worker_info()
    batch["_worker"] = 0 if info is None else info.id
    batch["_counts"] = dict(decoder.counts, tar_error=tar_errors.count)
    return batch


def shard_slice(urls, rank, world_size, worker, num_workers):
    """Split by node and by worker: each (rank, worker) resamples from its own disjoint slice of the
    shards when there are enough of them, otherwise from all of them (with its own seed)."""
    n = world_size * num_workers
    i = rank * num_workers + worker
    return urls[i::n] if len(urls) >= n else urls


class ResampledSlice(torch.utils.data.IterableDataset):
    """Endless stream of shard URLs for this rank and worker, seeded by (seed, rank, worker)."""

    def __init__(self, urls, seed, rank=0, world_size=1, check_progress=None):
        super().__init__()
        self.urls, self.seed, self.rank, self.world_size = urls, seed, rank, world_size
        self.check_progress = check_progress

    def __iter__(self):
        rank, world_size = self.rank, self.world_size
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        urls = shard_slice(self.urls, rank, world_size, worker, num_workers)
        rng = np.random.default_rng([self.seed, rank, worker])
        for n in itertools.count():
            if self.check_progress is not None:
                self.check_progress(n)
            yield dict(url=urls[rng.integers(len(urls))])


class Loader:
    """Iterate batches forever; `counts` sums the skip counters of every worker of this rank. `close()`
    stops the workers; it also runs when the Loader is collected and at interpreter exit."""

    def __init__(self, dataloader):
        self.dataloader, self.per_worker = dataloader, {}
        self.close = weakref.finalize(self, shutdown_workers, dataloader)

    def __iter__(self):
        while True:
            try:
                for batch in self.dataloader:
                    self.per_worker[batch.pop("_worker")] = batch.pop("_counts")
                    yield batch
            except RunError as e:  # from a worker, DataLoader puts the worker's traceback in the message
                raise RunError(str(e).rstrip().splitlines()[-1].partition("RunError: ")[2] or str(e)) from None

    @property
    def counts(self):
        total = {}
        for c in self.per_worker.values():
            for k, v in c.items():
                total[k] = total.get(k, 0) + v
        return total


def init_worker(worker_id):
    """Ctrl-C, torchrun and SLURM send SIGINT/SIGTERM to the data workers too. Only the main process acts
    on them (it finishes the step, saves a checkpoint, stops); a worker killed by the signal would abort
    it mid-step instead. `Loader` shuts the workers down itself. One thread per worker: decoding needs no
    more, and each worker would otherwise start as many as there are cores, against the trainer."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.set_num_threads(1)


def shutdown_workers(dataloader):
    """DataLoader's own orderly shutdown of its persistent workers (they ignore SIGTERM, so the
    interpreter's exit-time terminate() would wait for them forever)."""
    it = getattr(dataloader, "_iterator", None)
    if it is not None and hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()


def make_loader(shards, resolution, batch_size, num_workers=4, min_aesthetic=None, seed=0, extra=None,
                shuffle=1000, rank=0, world_size=1, aesthetic_key="aesthetic_score"):
    """The training stream of one rank: resampled shards, split by rank and worker, shuffled, decoded,
    filtered and batched without partial batches. `shards`: a list of URL patterns (already checked with
    expand_shards). `min_aesthetic` None (or negative) turns the aesthetic filter off."""
    if min_aesthetic is not None and min_aesthetic < 0:
        min_aesthetic = None
    decoder = SampleDecoder(resolution, min_aesthetic, extra, aesthetic_key)
    tar_errors = TarErrors(decoder)
    dataset = wds.DataPipeline(
        ResampledSlice(expand_shards(shards), seed, rank, world_size, tar_errors.check_progress),
        wds.tarfile_to_samples(handler=tar_errors),
        tar_errors.counted,
        wds.shuffle(shuffle, seed=seed * 1000 + rank),  # the shard streams differ per worker
        decoder,
        wds.batched(batch_size, partial=False, collation_fn=partial(collate, decoder=decoder, tar_errors=tar_errors)),
    )
    dataloader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers,
                                             pin_memory=torch.cuda.is_available(),
                                             persistent_workers=num_workers > 0, worker_init_fn=init_worker)
    return Loader(dataloader)


# ------------------------------------------------------------------------------------------------------
# 2. timesteps: phases and the start-index distribution (paper section 3.2)
# ------------------------------------------------------------------------------------------------------

# mixture weights pi_j over the modes at [0, K/4, K/2, 3K/4], one row per training phase
MODE_PROBS = ((0.0, 0.0, 0.5, 0.5), (0.1, 0.3, 0.3, 0.3), (0.25, 0.25, 0.25, 0.25), (0.4, 0.2, 0.2, 0.2))


def phase_of(step, phase_steps):
    """Index of the phase that batch `step` (0-based) belongs to; the last phase continues past the end."""
    end = 0
    for phase, n in enumerate(phase_steps):
        end += n
        if step < end:
            return phase
    return len(phase_steps) - 1


def start_index_probs(K, mode_probs=MODE_PROBS[0], kind="mixture", var=0.5):
    """Probability of each solver start index i in 0..K-1 (index 0 = pure noise).
    mixture: sum_j pi_j exp(-(i - loc_j)^2 / var), loc_j = j * (K // M); uniform; gaussian around K/2."""
    i = torch.arange(K, dtype=torch.float64)
    if kind == "mixture":
        locs = torch.arange(len(mode_probs), dtype=torch.float64) * (K // len(mode_probs))
        p = (torch.tensor(mode_probs, dtype=torch.float64)[:, None]
             * torch.exp(-(i[None] - locs[:, None]) ** 2 / var)).sum(0)
    elif kind == "uniform":
        p = torch.ones(K, dtype=torch.float64)
    elif kind == "gaussian":
        p = torch.exp(-(i - K / 2) ** 2 / K)
    else:
        raise ValueError(f"unknown start-index distribution {kind!r}")
    return p / p.sum()


def sample_start_index(probs, generator=None):
    return int(torch.multinomial(probs, 1, generator=generator))


# ------------------------------------------------------------------------------------------------------
# 3. losses and scalings (paper section 3.3)
# ------------------------------------------------------------------------------------------------------

def lcm_boundary(t, sigma_data=0.5, timestep_scaling=10.0):
    """LCM boundary-condition scalings: x_hat = c_skip * x_t + c_out * x0; c_skip(0) = 1, c_out(0) = 0."""
    t = t * timestep_scaling
    c_skip = sigma_data ** 2 / (t ** 2 + sigma_data ** 2)
    c_out = t / (t ** 2 + sigma_data ** 2) ** 0.5
    return c_skip, c_out


PREDICTION_TYPES = ("epsilon", "v_prediction")  # what a UNet script's x0 formulas handle


def x0_and_eps(out, x_t, a, prediction_type="epsilon"):
    """A denoiser's output at x_t as (x0, eps); a: abar at its timestep, broadcast to x_t. v is
    turned into x0 directly, so x0 stays finite where a zero-terminal-SNR schedule has abar = 0
    (the epsilon route divides by sqrt(abar))."""
    if prediction_type == "epsilon":
        return (x_t - (1 - a).sqrt() * out) / a.sqrt(), out
    if prediction_type == "v_prediction":
        return a.sqrt() * x_t - (1 - a).sqrt() * out, (1 - a).sqrt() * x_t + a.sqrt() * out
    raise ValueError(f"unknown prediction type {prediction_type!r}; known: {PREDICTION_TYPES}")


def lcm_x0(x_t, out, t, alphas_cumprod, prediction_type="epsilon"):
    """The student's one-step output: its prediction at t (B,) (epsilon or v) turned into x0, then
    the boundary scalings, x_hat = c_skip x_t + c_out x0 (LCMScheduler's `denoised`)."""
    a = bcast(alphas_cumprod[t], x_t)
    c_skip, c_out = (bcast(c, x_t) for c in lcm_boundary(t.float()))
    if prediction_type == "epsilon":  # this order of operations, bit for bit as before v existed
        return c_skip * x_t + c_out * (x_t - (1 - a).sqrt() * out) / a.sqrt()
    return c_skip * x_t + c_out * x0_and_eps(out, x_t, a, prediction_type)[0]


def bcast(a, x):
    """Per-sample coefficients (B,) -> (B, 1, 1, 1) to scale x."""
    return a.reshape(-1, *([1] * (x.ndim - 1)))


def renoise(x0, noise, t, alphas_cumprod):
    """Forward diffusion at the true level of t (B,): sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
    a = bcast(alphas_cumprod[t], x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def renoise_level(t, grid, kind="true"):
    """The timestep whose noise level re-noises DMD's and the discriminator's inputs for t (B,). "true":
    t itself. "original": as the original code's DPMSolverMultistepScheduler.add_noise after
    set_timesteps(K), t where it is on the teacher's K-step grid, else the grid's last timestep (a
    near-clean level). The networks and DMD's coefficient are told t either way."""
    if kind == "true":
        return t
    on_grid = (t[:, None] == grid.to(t)[None, :]).any(1)
    return torch.where(on_grid, t, grid[-1].to(t))


def renoise_flow(x0, noise, sigma):
    """Flow matching's forward process (SD3) at sigma (B,): sigma noise + (1 - sigma) x0; pure noise at 1."""
    s = bcast(sigma, x0)
    return s * noise + (1 - s) * x0


def center_crop_latents(z, size=64):
    """Centre crop of the latents (the paper decodes 64x64 latent crops for LPIPS)."""
    h, w = z.shape[-2:]
    sh, sw = min(size, h), min(size, w)
    h0, w0 = (h - sh) // 2, (w - sw) // 2
    return z[..., h0:h0 + sh, w0:w0 + sw]


def distill_loss(x_hat, x_T, kind="lpips", decode=None, lpips_fn=None):
    """Student one-step output vs teacher K-step output. lpips: decode the 64x64 centre latent crops
    (gradients flow through the decoder into x_hat), clamp to [-1, 1], LPIPS mean. l2 / l1: latent
    space, mean per sample then over the batch."""
    if kind == "lpips":
        a = decode(center_crop_latents(x_hat)).clamp(-1, 1)
        with torch.no_grad():
            b = decode(center_crop_latents(x_T)).clamp(-1, 1)
        return lpips_fn(a.float(), b.float()).mean()
    if kind == "l2":
        return F.mse_loss(x_hat.float(), x_T.float())
    if kind == "l1":
        return F.l1_loss(x_hat.float(), x_T.float())
    raise ValueError(f"unknown distillation loss {kind!r}")


def make_lpips():
    """LPIPS-VGG with its real weights (torchvision downloads VGG16 once, ~528 MB)."""
    import lpips
    try:
        return lpips.LPIPS(net="vgg", verbose=False)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UsageError(
            f"--distill_loss lpips needs torchvision's VGG16 weights, which could not be loaded ({type(e).__name__}: "
            f"{first}); download https://download.pytorch.org/models/vgg16-397923af.pth into "
            "~/.cache/torch/hub/checkpoints/ (or $TORCH_HOME/hub/checkpoints/), or use --distill_loss l2") from e


def dmd_loss(x_hat, y, e_real, e_fake, alphas_cumprod_t2, prediction_type="epsilon"):
    """Distribution matching given the denoiser outputs (epsilon or v) at y = renoise(x_hat, n, t2):
    e_real: teacher with CFG (real score), e_fake: student (fake score). The gradient on x_hat is
    2 / N * wgt * (x0_fake - x0_real), written as an MSE to a detached target."""
    x_hat, y, e_real, e_fake = x_hat.float(), y.float(), e_real.float(), e_fake.float()
    a = bcast(alphas_cumprod_t2, x_hat)
    if prediction_type != "epsilon":  # x0 straight from the outputs: finite at abar = 0
        x0_real = x0_and_eps(e_real, y, a, prediction_type)[0]
        return dmd_from_x0(x_hat, x0_and_eps(e_fake, y, a, prediction_type)[0] - x0_real, x0_real)
    coeff = (e_real - e_fake) * (1 - a).sqrt() / a.sqrt()  # = x0_fake - x0_real
    x0_real = (y - (1 - a).sqrt() * e_real) / a.sqrt()
    return dmd_from_x0(x_hat, coeff, x0_real)


def dmd_loss_flow(x_hat, y, v_real, v_fake, sigma_t2):
    """dmd_loss for flow matching (SD3), given the velocities at y = renoise_flow(x_hat, n, sigma_t2):
    x0 = y - sigma v, so x0_fake - x0_real = sigma (v_real - v_fake)."""
    x_hat, y, v_real, v_fake = x_hat.float(), y.float(), v_real.float(), v_fake.float()
    s = bcast(sigma_t2.float(), x_hat)
    return dmd_from_x0(x_hat, s * (v_real - v_fake), y - s * v_real)


def dmd_from_x0(x_hat, coeff, x0_real):
    """The DMD step shared by both parameterisations: coeff = x0_fake - x0_real, weighted per sample by
    1 / mean|x_hat - x0_real| (detached), as an MSE to a detached target."""
    wgt = 1.0 / ((x_hat - x0_real).abs().mean(dim=tuple(range(1, x_hat.ndim)), keepdim=True) + 1e-5)
    return F.mse_loss(x_hat, (x_hat - wgt * coeff).detach())


def gan_g_loss(logits_fake, kind="lsgan"):
    """Generator side. lsgan works on sigmoid outputs (the released configs); hinge and non_saturating
    on raw logits."""
    if kind == "lsgan":
        return ((torch.sigmoid(logits_fake) - 1) ** 2).mean()
    if kind == "hinge":
        return -logits_fake.mean()
    if kind == "non_saturating":
        return F.softplus(-logits_fake).mean()
    raise ValueError(f"unknown GAN loss {kind!r}")


def gan_d_loss(logits_real, logits_fake, kind="lsgan"):
    if kind == "lsgan":
        return 0.5 * (((torch.sigmoid(logits_real) - 1) ** 2).mean() + (torch.sigmoid(logits_fake) ** 2).mean())
    if kind == "hinge":
        return F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean()
    if kind == "non_saturating":
        return F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean()
    raise ValueError(f"unknown GAN loss {kind!r}")
