"""Backbone-free pieces shared by every flash_*.py script.

Nothing here touches a model's call signature. Sections, in the order a reader of the paper meets them:
  1. data: the webdataset pipeline (image + caption shards -> batches of pixel_values and text)
  2. timesteps: phase schedule and the Gaussian-mixture start-index distribution (paper section 3.2)
  3. losses: distillation, DMD, GAN, the LCM boundary scalings, re-noising
  4. run plumbing: torch.distributed set-up, metrics, checkpoints, stop signals
"""
import glob
import io
import itertools
import json
import logging
import os
import signal
import shutil
import weakref
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
import webdataset as wds
from braceexpand import braceexpand
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from PIL import Image, ImageFile, ImageOps
from tqdm import tqdm

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated jpg must fail to decode, so it is skipped and counted

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
MAX_FILTERED = 500  # samples read with none passing the filters before we stop and say why
MAX_NONFINITE = 5  # non-finite losses in a row before training stops


class UsageError(ValueError):
    """A bad flag or input found at start-up; the message names the flag and the fix."""


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


class SampleDecoder:
    """webdataset stage: raw tar samples -> {pixel_values, text, **extra}; bad samples are skipped and
    counted. `extra(sample, img)` (img: the cropped RGB image) lets a script add fields, e.g. an edge map;
    it may raise ValueError to reject a sample. Counts travel with each batch (see `Loader`)."""

    def __init__(self, resolution, min_aesthetic=None, extra=None):
        self.resolution, self.min_aesthetic, self.extra = resolution, min_aesthetic, extra
        self.counts = dict(read=0, bad_image=0, no_caption=0, filtered=0, bad_extra=0)

    def __call__(self, src):
        kept = 0
        for sample in src:
            self.counts["read"] += 1
            out = self.decode(sample)
            if out is None and kept == 0 and self.counts["read"] >= MAX_FILTERED:
                raise RuntimeError(self.nothing_passes())
            if out is not None:
                kept += 1
                yield out

    def decode(self, sample):
        key = next((k for k in IMAGE_KEYS if k in sample), None)
        try:
            meta = json.loads(sample["json"]) if "json" in sample else {}
            caption = meta.get("caption")
        except (ValueError, UnicodeDecodeError, AttributeError):
            caption = None
        if not isinstance(caption, str) or not caption.strip():
            self.counts["no_caption"] += 1
            return None
        if self.min_aesthetic is not None:
            score = meta.get("aesthetic_score")
            if not isinstance(score, (int, float)) or score < self.min_aesthetic:
                self.counts["filtered"] += 1
                return None
        if key is None:
            self.counts["bad_image"] += 1
            return None
        try:
            with Image.open(io.BytesIO(sample[key])) as img:
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
        hint = ""
        if c["filtered"] >= c["read"] // 2:
            hint = (f" {c['filtered']} failed the aesthetic filter (json 'aesthetic_score' >= "
                    f"{self.min_aesthetic}): lower --min_aesthetic, or pass --min_aesthetic -1 to turn it off.")
        elif c["no_caption"] >= c["read"] // 2:
            hint = f" {c['no_caption']} had no json 'caption': see the README's sample layout."
        elif c["bad_image"] >= c["read"] // 2:
            hint = f" {c['bad_image']} had no readable jpg/jpeg/png/webp image."
        elif c["bad_extra"] >= c["read"] // 2:
            hint = (f" {c['bad_extra']} lacked the script's extra input (e.g. the edge map named by --edge_key "
                    "is missing or unreadable).")
        return f"no usable sample in the first {c['read']} read from --shards ({c}).{hint}"


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
            raise RuntimeError(f"--shards: {shards_opened} shards opened and not one sample in them "
                               f"({self.count} read errors); give webdataset tars of <key>.jpg + <key>.json")

    def __call__(self, exn):
        self.count += 1
        if self.decoder.counts["read"] == 0 and self.count >= 50:
            raise RuntimeError(f"--shards: {self.count} read errors and not one sample read (last: {exn!r}); "
                               "check that the shards are readable tar files")
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

    def __init__(self, urls, seed, check_progress=None):
        super().__init__()
        self.urls, self.seed, self.check_progress = urls, seed, check_progress

    def __iter__(self):
        rank, world_size = get_rank_world()
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
            for batch in self.dataloader:
                self.per_worker[batch.pop("_worker")] = batch.pop("_counts")
                yield batch

    @property
    def counts(self):
        total = {}
        for c in self.per_worker.values():
            for k, v in c.items():
                total[k] = total.get(k, 0) + v
        return total


def ignore_stop_signals(worker_id):
    """Ctrl-C, torchrun and SLURM send SIGINT/SIGTERM to the data workers too. Only the main process acts
    on them (it finishes the step, saves a checkpoint, stops); a worker killed by the signal would abort
    it mid-step instead. `Loader` shuts the workers down itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def shutdown_workers(dataloader):
    """DataLoader's own orderly shutdown of its persistent workers (they ignore SIGTERM, so the
    interpreter's exit-time terminate() would wait for them forever)."""
    it = getattr(dataloader, "_iterator", None)
    if it is not None and hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()


def make_loader(shards, resolution, batch_size, num_workers=4, min_aesthetic=None, seed=0, extra=None,
                shuffle=1000):
    """The training stream: resampled shards, split by node and worker, shuffled, decoded, filtered and
    batched without partial batches. `shards`: a list of URL patterns (already checked with
    expand_shards). `min_aesthetic` None (or negative) turns the aesthetic filter off."""
    if min_aesthetic is not None and min_aesthetic < 0:
        min_aesthetic = None
    decoder = SampleDecoder(resolution, min_aesthetic, extra)
    tar_errors = TarErrors(decoder)
    dataset = wds.DataPipeline(
        ResampledSlice(expand_shards(shards), seed, tar_errors.check_progress),
        wds.tarfile_to_samples(handler=tar_errors),
        tar_errors.counted,
        wds.shuffle(shuffle, seed=seed * 1000 + get_rank_world()[0]),  # the shard streams differ per worker
        decoder,
        wds.batched(batch_size, partial=False, collation_fn=partial(collate, decoder=decoder, tar_errors=tar_errors)),
    )
    dataloader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers,
                                             pin_memory=torch.cuda.is_available(),
                                             persistent_workers=num_workers > 0, worker_init_fn=ignore_stop_signals)
    return Loader(dataloader)


# ------------------------------------------------------------------------------------------------------
# 2. timesteps: phases and the start-index distribution (paper section 3.2, METHOD.md section 4)
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
# 3. losses and scalings (METHOD.md section 5)
# ------------------------------------------------------------------------------------------------------

def lcm_boundary(t, sigma_data=0.5, timestep_scaling=10.0):
    """LCM boundary-condition scalings: x_hat = c_skip * x_t + c_out * x0; c_skip(0) = 1, c_out(0) = 0."""
    t = t * timestep_scaling
    c_skip = sigma_data ** 2 / (t ** 2 + sigma_data ** 2)
    c_out = t / (t ** 2 + sigma_data ** 2) ** 0.5
    return c_skip, c_out


def bcast(a, x):
    """Per-sample coefficients (B,) -> (B, 1, 1, 1) to scale x."""
    return a.reshape(-1, *([1] * (x.ndim - 1)))


def renoise(x0, noise, t, alphas_cumprod):
    """Forward diffusion at the true level of t (B,): sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
    a = bcast(alphas_cumprod[t], x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


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
        raise RuntimeError(
            "--distill_loss lpips needs torchvision's VGG16 weights (vgg16-397923af.pth), which could not be "
            f"loaded ({e!r}). Put the file in ~/.cache/torch/hub/checkpoints/ or use --distill_loss l2.") from e


def dmd_loss(x_hat, y, e_real, e_fake, alphas_cumprod_t2):
    """Distribution matching given the denoiser outputs at y = renoise(x_hat, n, t2):
    e_real: teacher with CFG (real score), e_fake: student (fake score). The gradient on x_hat is
    2 / N * wgt * (x0_fake - x0_real), written as an MSE to a detached target."""
    x_hat, y, e_real, e_fake = x_hat.float(), y.float(), e_real.float(), e_fake.float()
    a = bcast(alphas_cumprod_t2, x_hat)
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


# ------------------------------------------------------------------------------------------------------
# 4. run plumbing: distributed set-up, logging, metrics, checkpoints, stop signals
# ------------------------------------------------------------------------------------------------------

def get_rank_world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def setup_distributed():
    """torchrun sets RANK: one process per device, nccl on CUDA, gloo on CPU. Otherwise a single process.
    Returns (rank, world_size, device)."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, device_id=device if backend == "nccl" else None)
    return dist.get_rank(), dist.get_world_size(), device


def cleanup_distributed():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce(t, op="mean"):
    """In-place all-reduce (mean or max) of a tensor; a no-op in a single process."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        if op == "mean":
            t /= dist.get_world_size()
    return t


class TqdmHandler(logging.StreamHandler):
    """Log lines printed above the progress bar instead of through it."""

    def emit(self, record):
        tqdm.write(self.format(record))


def get_logger(rank, output_dir=None):
    """Rank 0 logs to stdout (and output_dir/log.txt); other ranks get a null handler."""
    logger = logging.getLogger("flash")
    logger.handlers.clear()
    logger.propagate = False
    if rank == 0:
        logger.setLevel(logging.INFO)
        fmt = logging.Formatter("[%(asctime)s] %(message)s", "%H:%M:%S")
        handlers = [TqdmHandler()]
        if output_dir:
            handlers.append(logging.FileHandler(os.path.join(output_dir, "log.txt")))
        for h in handlers:
            h.setFormatter(fmt)
            logger.addHandler(h)
    else:
        logger.addHandler(logging.NullHandler())
    return logger


def append_jsonl(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux reports KiB


def start_run(args):
    """Processes, output folder, rank-aware logger, TF32, and the init seed shared by every rank (the LoRA
    and the head start identical; DDP also broadcasts rank 0's). Returns (rank, world_size, device, log)."""
    rank, world_size, device = setup_distributed()
    if rank == 0:
        prepare_output_dir(args.output_dir, args.overwrite, args.resume)
    barrier()
    log = get_logger(rank, args.output_dir)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed)
    return rank, world_size, device, log


def compile_blocks(model, block_types):
    """--compile: regional compilation. Every module of the given classes (the repeated transformer and
    ResNet blocks) is compiled in place (nn.Module.compile): saved keys never carry a compile prefix, the
    model's own forward (its branches on timesteps and conditioning) stays eager, and blocks of the same
    class and shape share one graph, so compiling takes seconds per graph rather than minutes per model.
    Graphs are keyed by shape, grad mode and LoRA on/off (student, teacher, features), never by the start
    index, phase or guidance."""
    n = 0
    for module in model.modules():
        if type(module).__name__ in block_types:
            module.compile(dynamic=False)
            n += 1
    if n == 0:
        raise UsageError(f"--compile: no {' or '.join(block_types)} in {type(model).__name__} to compile; "
                         "name this model's repeated block classes in its script's COMPILE_BLOCKS")
    # all compiled modules share one frame (Module._call_impl), so the graph cache must hold every
    # (class, shape, mode) variant; past the limit dynamo would silently fall back to eager
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 1024)


def make_trainable(denoiser, disc, args, device, world_size, resume_dir, log):
    """DDP wraps only what trains: the student call through the denoiser (its LoRA gradients; its blocks
    compiled in place with --compile) and the discriminator head. AdamW for each; the state restored from
    `resume_dir` if given, else each rank seeded with seed + rank. Returns (student, disc_ddp, opt_g, opt_d,
    step, counters)."""
    ddp_kw = dict(device_ids=[device.index]) if device.type == "cuda" else {}
    student = DDP(denoiser, **ddp_kw) if world_size > 1 else denoiser
    disc_ddp = DDP(disc, **ddp_kw) if world_size > 1 else disc
    lora_params = [p for p in denoiser.parameters() if p.requires_grad]
    fused = dict(fused=True) if device.type == "cuda" else {}
    opt_g = torch.optim.AdamW(lora_params, lr=args.lr, **fused)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=args.lr_disc, **fused)
    log.info(f"LoRA {sum(p.numel() for p in lora_params) / 1e6:.2f}M + discriminator "
             f"{sum(p.numel() for p in disc.parameters()) / 1e6:.2f}M trainable parameters; "
             f"{world_size} process(es) on {device.type}")
    step, counters = 0, dict(nonfinite=0)
    if resume_dir:
        step, counters = restore_training_state(load_training_state(resume_dir), denoiser, disc, opt_g, opt_d,
                                                args, device, log)
        log.info(f"resumed from {resume_dir} at step {step}")
    else:
        torch.manual_seed(args.seed + get_rank_world()[0])
    return student, disc_ddp, opt_g, opt_d, step, counters


class Tally:
    """The loop's bookkeeping between log lines: loss sums, training time, non-finite skips (MAX_NONFINITE
    in a row stop training with an error)."""

    def __init__(self, counters):
        self.counters, self.in_a_row = counters, 0
        self.reset()

    def reset(self):
        self.sums, self.steps, self.seconds = {}, 0, 0.0

    def record(self, losses, updated, seconds, step, log, output_dir):
        """Returns 1 if the update happened (the step advances), 0 if it was skipped."""
        if updated:
            self.in_a_row, self.steps, self.seconds = 0, self.steps + 1, self.seconds + seconds
            self.sums = {k: self.sums.get(k, 0) + v for k, v in losses.items()}
            return 1
        self.counters["nonfinite"] += 1
        self.in_a_row += 1
        log.info(f"step {step}: non-finite loss, update skipped ({self.in_a_row} in a row)")
        if self.in_a_row >= MAX_NONFINITE:
            raise RuntimeError(f"{MAX_NONFINITE} non-finite losses in a row at step {step}; the last good "
                               f"checkpoint is in {output_dir}/checkpoints. Try a lower --lr, "
                               "--mixed_precision no, or check the data.")
        return 0

    def flush(self, args, step, loader, device, log):
        last = log_metrics(args, step, self.sums, self.steps, self.seconds, self.counters, loader, device, log)
        self.reset()
        return last


def check_run_args(args):
    """Start-up checks of the flags every script shares (nothing here depends on the backbone)."""
    if args.guidance_min > args.guidance_max:
        raise UsageError("--guidance_min must not exceed --guidance_max")
    if min(args.phase_steps) < 0 or sum(args.phase_steps) == 0:
        raise UsageError("--phase_steps: four non-negative batch counts with a positive sum")
    for p, n in enumerate(args.phase_steps):
        if n and args.distill_weights[p] <= 0 and args.dmd_weights[p] <= 0 and args.adv_weights[p] <= 0:
            raise UsageError(f"phase {p} has no positive loss weight: raise one of --distill_weights, "
                             "--dmd_weights, --adv_weights for it")
    for flag in ("batch_size", "log_every", "sample_every", "checkpoint_every", "resolution", "max_steps",
                 "lora_rank", "lora_alpha", "lr", "lr_disc"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            raise UsageError(f"--{flag} must be positive")
    if args.num_workers < 0 or args.keep_checkpoints < 0:
        raise UsageError("--num_workers and --keep_checkpoints must not be negative")
    if not 4 <= args.num_teacher_steps <= 1000:  # the mixture's 4 modes sit at multiples of K // 4
        raise UsageError("--num_teacher_steps: K must be between 4 and 1000")
    expand_shards(args.shards)
    check_output_dir(args.output_dir, args.resume, args.overwrite)


def log_metrics(args, step, sums, n_steps, train_time, counters, loader, device, log):
    """Every --log_every updates: loss terms (and start t, w) averaged over the steps and all ranks, speed,
    memory and the data counters, appended to metrics.jsonl by rank 0 and written to the log. Returns the
    averages. Every rank must call it."""
    last = mean_over_ranks(sums, n_steps, device)
    record = dict(step=step, phase=phase_of(step - 1, args.phase_steps), K=args.num_teacher_steps, **last,
                  it_per_s=n_steps / max(train_time, 1e-9), peak_mem_gb=peak_memory_gb(device),
                  nonfinite=counters["nonfinite"], data=sum_counts_over_ranks(loader.counts, device))
    if get_rank_world()[0] == 0:
        append_jsonl(os.path.join(args.output_dir, "metrics.jsonl"), record)
    log.info(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
    return last


def training_state(denoiser, disc, opt_g, opt_d, args, step, counters, device):
    """Everything --resume needs, as plain tensors and primitives: the denoiser's LoRA, the discriminator,
    both optimizers, every rank's RNG, the flags as a dict. Every rank must call it (RNG gather); only
    rank 0 gets the state, the others None."""
    rng = gather_rng_states(device)
    if get_rank_world()[0] != 0:
        return None
    return dict(step=step, config=vars(args), counters=dict(counters), rng=rng,
                lora={k: v.detach().cpu() for k, v in get_peft_model_state_dict(denoiser).items()},
                disc={k: v.detach().cpu() for k, v in disc.state_dict().items()},
                opt_g=opt_g.state_dict(), opt_d=opt_d.state_dict())


def restore_training_state(state, denoiser, disc, opt_g, opt_d, args, device, log):
    """Load a training state. The LoRA's shape and scale and the model must match; other flags may change
    on resume (e.g. longer phases or a new learning rate), and the changes are logged. Returns (step,
    counters)."""
    saved = state["config"]
    for flag in ("lora_rank", "lora_alpha", "model"):
        if saved[flag] != getattr(args, flag):
            raise UsageError(f"--resume: the checkpoint has --{flag} {saved[flag]}, this run "
                             f"{getattr(args, flag)}; resume with the same value")
    changed = {k: (saved.get(k), v) for k, v in vars(args).items() if k not in ("resume", "overwrite")
               and saved.get(k) != v}
    if changed:
        log.info(f"flags changed since the checkpoint (saved, now): {changed}")
    set_peft_model_state_dict(denoiser, {k: v.to(device) for k, v in state["lora"].items()})
    disc.load_state_dict(state["disc"])
    for opt, key, lr in ((opt_g, "opt_g", args.lr), (opt_d, "opt_d", args.lr_disc)):
        opt.load_state_dict(state[key])
        for group in opt.param_groups:
            group["lr"] = lr  # the command line wins over the saved learning rate
    rank = get_rank_world()[0]
    if not set_rng_state(state["rng"], rank, device):
        torch.manual_seed(args.seed + rank + 100_003 * state["step"])  # more ranks than saved
    return state["step"], state["counters"]


def list_checkpoints(output_dir):
    root = os.path.join(output_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    names = [n for n in os.listdir(root) if n.startswith("step_") and n[5:].isdigit()
             and os.path.isfile(os.path.join(root, n, "training_state.pt"))]
    return [os.path.join(root, n) for n in sorted(names, key=lambda n: int(n[5:]))]


def resolve_resume(resume, output_dir):
    """--resume latest|PATH -> checkpoint folder, or None when starting fresh. Raises a ValueError with
    the fix when nothing matches."""
    if not resume:
        return None
    if resume == "latest":
        ckpts = list_checkpoints(output_dir)
        if not ckpts:
            raise UsageError(f"--resume latest: no checkpoint in {output_dir}/checkpoints; "
                             "drop --resume to start a new run")
        return ckpts[-1]
    if not os.path.isfile(os.path.join(resume, "training_state.pt")):
        raise UsageError(f"--resume {resume}: no training_state.pt there; give a checkpoints/step_NNNNNN folder "
                         "or 'latest'")
    return resume


def check_output_dir(output_dir, resume, overwrite):
    """Refuse to mix a new run into an old one: a run's outputs exist and neither --resume nor
    --overwrite was given."""
    used = os.path.isdir(output_dir) and any(
        os.path.exists(os.path.join(output_dir, n)) for n in ("checkpoints", "metrics.jsonl"))
    if used and not resume and not overwrite:
        raise UsageError(f"--output_dir {output_dir} already holds a run; pass --resume latest to continue it, "
                         "--overwrite to start over there, or choose another --output_dir")


def prepare_output_dir(output_dir, overwrite, resume):
    if overwrite and not resume:
        for n in ("checkpoints", "samples", "metrics.jsonl", "log.txt"):
            p = os.path.join(output_dir, n)
            shutil.rmtree(p) if os.path.isdir(p) else (os.path.exists(p) and os.remove(p))
    os.makedirs(os.path.join(output_dir, "samples"), exist_ok=True)
    os.makedirs(os.path.join(output_dir, "checkpoints"), exist_ok=True)


def save_checkpoint(output_dir, step, state, export_lora, keep):
    """Rank 0 writes checkpoints/step_NNNNNN/ (training_state.pt + the exported LoRA) under a temporary
    name, renames it when complete, and keeps the newest `keep`. Every rank must call it (barrier)."""
    if get_rank_world()[0] == 0:
        root = os.path.join(output_dir, "checkpoints")
        final = os.path.join(root, f"step_{step:06d}")
        tmp = final + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        torch.save(state, os.path.join(tmp, "training_state.pt"))
        export_lora(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier()


def load_training_state(ckpt_dir):
    return torch.load(os.path.join(ckpt_dir, "training_state.pt"), map_location="cpu", weights_only=True)


def rng_state(device):
    """This process's torch RNG states (CPU and, when used, the current CUDA device)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def gather_rng_states(device):
    """Every rank's RNG state, as a list indexed by rank (for rank 0 to save)."""
    state = rng_state(device)
    if not (dist.is_available() and dist.is_initialized()):
        return [state]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def set_rng_state(states, rank, device):
    if rank >= len(states):
        return False  # resumed with more ranks than saved: the caller reseeds
    torch.set_rng_state(states[rank]["cpu"])
    if device.type == "cuda" and "cuda" in states[rank]:
        torch.cuda.set_rng_state(states[rank]["cuda"], device)
    return True


class StopSignal:
    """SIGTERM / SIGINT set a flag instead of killing the process, so the loop can agree across ranks to
    save a checkpoint and stop. A second SIGINT interrupts at once."""

    def __init__(self):
        self.requested = False
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def restore(self):
        for s, h in self.previous.items():
            signal.signal(s, h)


def check_finite_and_stop(losses, stop, device):
    """One small all-reduce per step: did any rank see a non-finite loss, did any rank get a stop signal.
    Returns (any_nonfinite, any_stop) as Python bools."""
    bad = torch.stack([~torch.isfinite(l.detach()).all() for l in losses]).any().float()
    flags = torch.stack([bad, torch.tensor(float(stop), device=bad.device)]).to(device)
    all_reduce(flags, op="max")
    bad, stop = flags.tolist()  # the loop's one host sync per step: every rank must take the same branch
    return bad > 0, stop > 0


def mean_over_ranks(sums, count, device):
    """{name: summed scalar tensor} over `count` steps -> {name: float} averaged over steps and ranks."""
    names = sorted(sums)
    t = torch.stack([sums[n].detach().float().to(device) for n in names]) / max(count, 1)
    all_reduce(t)
    return dict(zip(names, t.tolist()))


def sum_counts_over_ranks(counts, device):
    names = sorted(counts)
    t = torch.tensor([float(counts[n]) for n in names], device=device)
    all_reduce(t, op="sum")
    return {n: int(v) for n, v in zip(names, t.tolist())}


def image_grid(rows, labels=None):
    """rows: list of lists of PIL images (same size) -> one PIL image, with optional column labels."""
    from PIL import ImageDraw
    w, h = rows[0][0].size
    if w < 128:  # tiny test and toy models: upscale so the pictures and labels can be seen
        rows = [[img.resize((128, 128 * h // w), Image.NEAREST) for img in row] for row in rows]
        w, h = rows[0][0].size
    top = 14 if labels else 0
    grid = Image.new("RGB", (w * len(rows[0]), h * len(rows) + top), "white")
    if labels:
        draw = ImageDraw.Draw(grid)
        for j, label in enumerate(labels):
            draw.text((j * w + 2, 1), label, fill="black")
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            grid.paste(img, (j * w, top + i * h))
    return grid

