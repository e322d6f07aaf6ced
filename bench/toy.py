"""Toy-scale Flash Diffusion on a CPU: does the distillation work? The paper's table, at toy scale.

A procedurally drawn text-to-image world (a coloured circle, square or triangle on a coloured background,
captioned "a red circle on a blue background"), a real SD1.5-layout teacher trained on it, a judge that
reads shape and colours back from an image, then `flash_sd.py` run through its command line exactly as a
user runs it, and a table: alignment (the share of images the judge reads as their prompt, the analogue
of CLIP score) and Frechet distance of the judge's features (the analogue of FID), for the teacher at
32/8/4/2/1 DPM-Solver++ steps with CFG and the student at 4/2/1 LCM steps without.

    python bench/toy.py --quick      # every stage at smoke-test size, a few minutes (no quality claim)
    python bench/toy.py              # the full run: distillation and table, about an hour on 2 CPU cores

The teacher and judge ship with the repository (bench/toy_teacher/). The teacher's UNet and text encoder
were trained, keeping the VAE of an earlier teacher, on 2 CPU cores (an hour and a half) by
    python bench/toy.py --train_teacher --stages teacher --vae bench/toy_teacher/model/vae \
        --teacher_batch 512 --unet_steps 1311
(add --device cuda on a GPU; without --vae the VAE is trained first; --stages judge trains the judge).
Stages cache their outputs in --work_dir and are skipped when present; --fresh redoes them.
"""
import argparse
import io
import json
import math
import os
import shlex
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(ROOT, "bench", "toy_teacher")  # the shipped teacher (diffusers folder) and judge.pt
sys.path.insert(0, ROOT)

# ------------------------------------------------------------------------------------------------------
# 1. the world: shapes, colours, captions
# ------------------------------------------------------------------------------------------------------

SIZE = 16  # pixels; the VAE makes 4x8x8 latents of it
SHAPES = ["circle", "square", "triangle"]
COLOURS = {"red": (215, 40, 40), "green": (40, 170, 60), "blue": (45, 75, 225), "yellow": (235, 205, 45)}
NAMES = list(COLOURS)
# every (shape, shape colour, background colour) with the two colours different: 3 x 4 x 3 = 36 captions
COMBOS = [(s, f, b) for s in range(3) for f in range(4) for b in range(4) if f != b]


def caption(shape, fg, bg):
    return f"a {NAMES[fg]} {SHAPES[shape]} on a {NAMES[bg]} background"


def draw(labels, rng, ss=4):
    """(N, 3) int labels -> (N, SIZE, SIZE, 3) uint8 images: one shape at a random place and size, drawn
    at ss x the resolution and averaged down (anti-aliased edges)."""
    n, s = len(labels), SIZE * ss
    r = rng.uniform(3.5, 6.5, n)[:, None, None] * ss
    cx = rng.uniform(0, 1, n)[:, None, None] * (s - 2 * r) + r
    cy = rng.uniform(0, 1, n)[:, None, None] * (s - 2 * r) + r
    yy, xx = np.mgrid[0:s, 0:s] + 0.5
    dx, dy = xx - cx, yy - cy
    shape = labels[:, 0][:, None, None]
    circle = dx ** 2 + dy ** 2 <= r ** 2
    square = np.maximum(abs(dx), abs(dy)) <= 0.85 * r
    triangle = (dy >= -r) & (dy <= 0.8 * r) & (abs(dx) <= (dy + r) / 1.8)
    mask = np.where(shape == 0, circle, np.where(shape == 1, square, triangle))[..., None]
    palette = np.array(list(COLOURS.values()), dtype=np.float32)
    img = np.where(mask, palette[labels[:, 1]][:, None, None], palette[labels[:, 2]][:, None, None])
    img = img.reshape(n, SIZE, ss, SIZE, ss, 3).mean((2, 4))
    return np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)  # a little texture


def jpeg_roundtrip(images):
    """What the shards hold, and so what the teacher and the loader see."""
    out = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=95)
        out.append(buf.getvalue())
    return out


def real_images(labels, rng):
    """Data images for `labels` as float tensors in [-1, 1], (N, 3, SIZE, SIZE)."""
    decoded = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in jpeg_roundtrip(draw(labels, rng))]
    return torch.from_numpy(np.stack(decoded)).permute(0, 3, 1, 2).float() / 127.5 - 1


def random_labels(n, rng):
    return np.array(COMBOS)[rng.integers(0, len(COMBOS), n)]


def stage_data(args):
    """Webdataset shards in the README's format (jpg + json with caption and aesthetic_score)."""
    import webdataset as wds
    out = os.path.join(args.work_dir, "shards")
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(1)
    per = args.data_size // args.num_shards
    for i in tqdm(range(args.num_shards), desc="data: shards"):
        labels = random_labels(per, rng)
        with wds.TarWriter(os.path.join(out, f"{i:06d}.tar")) as sink:
            for j, (lab, jpg) in enumerate(zip(labels, jpeg_roundtrip(draw(labels, rng)))):
                sink.write({"__key__": f"{i:06d}_{j:06d}", "jpg": jpg,
                            "json": json.dumps({"caption": caption(*lab), "aesthetic_score": 6.5}).encode()})
    return out


def shard_pattern(args):
    return os.path.join(args.work_dir, "shards", f"{{000000..{args.num_shards - 1:06d}}}.tar")


# ------------------------------------------------------------------------------------------------------
# 2. the teacher: a tiny AutoencoderKL, CLIP text encoder and UNet, trained here, saved as SD1.5 layout
# ------------------------------------------------------------------------------------------------------

def byte_chars():
    """GPT-2's reversible byte -> printable character map (byte-level BPE vocabularies start with these 256
    characters), in its order; the tests' byte-level tokenizers use it too."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 256))
    cs, extra = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return [chr(c) for c in cs]


def toy_tokenizer():
    """A CLIP BPE tokenizer built in memory: every byte is a token, and merges make each word of the
    captions a single token (so a caption is 9 tokens)."""
    from transformers import CLIPTokenizer
    chars = byte_chars()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    merges, words = [], ["a", "on", "background"] + SHAPES + NAMES
    while True:  # add merges until every caption word is one token (BPE applies merges by rank, so a
        tok = CLIPTokenizer(vocab=vocab, merges=merges)  # later merge may not break an earlier word)
        split = [pieces for pieces in map(tok.tokenize, words) if len(pieces) > 1]
        if not split:
            break
        for pieces in split:
            merges.append((pieces[0], pieces[1]))
            vocab.setdefault(pieces[0] + pieces[1], len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=12)


def teacher_parts(tokenizer):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=16, sample_size=SIZE)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id))
    # cross-attention at both levels (8x8 and 4x4) and in the mid block, as SD1.5 has it at every level but
    # its lowest: the scripts' LoRA on the attention projections then reaches the 8x8 path too
    unet = UNet2DConditionModel(
        sample_size=SIZE // 2, in_channels=4, out_channels=4, block_out_channels=(48, 96), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2,
        cross_attention_dim=64, attention_head_dim=16, norm_num_groups=16)
    return vae, text_encoder, unet


def endless(n, batch, seed, device):
    """Batches of (labels, images in [-1, 1]) drawn from a fixed pool of n jpeg-roundtripped images."""
    rng = np.random.default_rng(seed)
    labels = random_labels(n, rng)
    images = torch.cat([real_images(labels[i:i + 2000], rng) for i in range(0, n, 2000)]).to(device)
    while True:
        idx = rng.integers(0, n, batch)
        yield labels[idx], images[torch.as_tensor(idx, device=device)]


def train_loop(desc, steps, params, lr, step_fn, seconds=None):
    """AdamW with warm-up and cosine decay. With `seconds`, the step count is cut after 50 steps to what
    fits that time (the reproducing command then names the count actually run)."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    total = [steps]
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / 200) * 0.5 * (1 + math.cos(math.pi * min(i / total[0], 1.0))))
    bar, t0, avg, i = tqdm(total=steps, desc=desc), time.time(), None, 0
    while i < total[0]:
        loss = step_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        i += 1
        bar.update()
        if i == 50 and seconds:
            total[0] = min(steps, int(seconds * 50 / (time.time() - t0)))
            bar.total = total[0]
        if i % 50 == 0:
            avg = loss.item() if avg is None else 0.8 * avg + 0.2 * loss.item()
            bar.set_postfix(loss=f"{avg:.4f}")
    bar.close()
    return time.time() - t0, i


def stage_teacher(args):
    """VAE first (reconstruction + a small KL), then the text encoder and UNet together (epsilon
    prediction, scaled-linear betas, 10 % of captions dropped to "" for CFG); saved as an SD1.5 folder."""
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline
    dev = torch.device(args.device)
    torch.manual_seed(0)
    tokenizer = toy_tokenizer()
    vae, text_encoder, unet = teacher_parts(tokenizer)
    vae, text_encoder, unet = vae.to(dev), text_encoder.to(dev), unet.to(dev)
    data = endless(args.teacher_pool, args.teacher_batch, seed=2, device=dev)
    drop = np.random.default_rng(0)  # caption dropout, seeded like everything else here

    def vae_step():
        _, x = next(data)
        post = vae.encode(x).latent_dist
        return F.mse_loss(vae.decode(post.sample()).sample, x) + 1e-6 * post.kl().mean()

    t_vae, n_vae = 0.0, 0
    if args.vae:  # an earlier teacher's VAE, scaling factor included
        from diffusers import AutoencoderKL
        vae = AutoencoderKL.from_pretrained(args.vae).to(dev)
    else:
        t_vae, n_vae = train_loop("teacher: VAE", args.vae_steps, list(vae.parameters()), 1e-3, vae_step)
    vae.requires_grad_(False).eval()
    if not args.vae:
        with torch.no_grad():  # scale latents to unit variance, as SD's 0.18215 does
            z = torch.cat([vae.encode(next(data)[1]).latent_dist.mean for _ in range(8)])
            vae.register_to_config(scaling_factor=float(1 / z.std()))
    ddpm = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000,
                          steps_offset=1)  # as SD1.5 ships it (0 is deprecated by diffusers)
    abar = ddpm.alphas_cumprod.to(dev)

    def unet_step():
        labels, x = next(data)
        caps = [caption(*lab) if drop.random() > 0.1 else "" for lab in labels]
        ids = tokenizer(caps, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(dev)
        with torch.no_grad():
            z0 = vae.encode(x).latent_dist.sample() * vae.config.scaling_factor
        t = torch.randint(0, 1000, (len(x),), device=dev)
        eps = torch.randn_like(z0)
        a = abar[t].view(-1, 1, 1, 1)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            pred = unet(a.sqrt() * z0 + (1 - a).sqrt() * eps, t, encoder_hidden_states=text_encoder(ids)[0]).sample
        return F.mse_loss(pred.float(), eps)

    params = list(unet.parameters()) + list(text_encoder.parameters())
    t_unet, n_unet = train_loop("teacher: text encoder + UNet", args.unet_steps, params, 1e-3, unet_step,
                                args.teacher_seconds)
    pipe = StableDiffusionPipeline(
        vae=vae.cpu(), text_encoder=text_encoder.cpu().eval(), tokenizer=tokenizer, unet=unet.cpu().eval(),
        scheduler=DPMSolverMultistepScheduler.from_config(ddpm.config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    out = os.path.join(args.work_dir, "teacher")
    pipe.save_pretrained(out)
    return out, dict(vae_s=t_vae, vae_steps=n_vae, unet_s=t_unet, unet_steps=n_unet)


# ------------------------------------------------------------------------------------------------------
# 3. the judge: reads shape, shape colour and background colour; its penultimate features give the FD
# ------------------------------------------------------------------------------------------------------

class Judge(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3, 1, 1), nn.ReLU(), nn.Conv2d(32, 64, 3, 2, 1), nn.ReLU(),
            nn.Conv2d(64, 64, 3, 2, 1), nn.ReLU(), nn.Flatten(), nn.Linear(64 * (SIZE // 4) ** 2, 128), nn.ReLU())
        self.heads = nn.ModuleList([nn.Linear(128, 3), nn.Linear(128, 4), nn.Linear(128, 4)])

    def forward(self, x):
        """x in [-1, 1] -> (features, [shape, colour, background logits])."""
        f = self.body(x)
        return f, [h(f) for h in self.heads]


def blur(x, sigma):
    """Per-image Gaussian blur (3x3), so the judge also reads the slightly soft images a VAE decodes."""
    k = torch.exp(-torch.tensor([-1.0, 0.0, 1.0], device=x.device) ** 2 / (2 * sigma.clamp(min=1e-3) ** 2)[:, None])
    k = (k / k.sum(1, keepdim=True)).to(x)
    k2 = (k[:, :, None] * k[:, None, :])  # (N, 3, 3)
    n, c, h, w = x.shape
    out = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate").reshape(1, n * c, h + 2, w + 2),
                   k2.repeat_interleave(c, 0)[:, None], groups=n * c)
    return out.reshape(n, c, h, w)


def stage_judge(args):
    dev = torch.device(args.device)
    torch.manual_seed(0)
    judge = Judge().to(dev)
    data = endless(args.teacher_pool, 256, seed=3, device=dev)

    def step():
        labels, x = next(data)
        x = blur(x, torch.rand(len(x), device=dev) * 0.8) + 0.03 * torch.randn_like(x)
        _, logits = judge(x)
        y = torch.as_tensor(labels, device=dev)
        return sum(F.cross_entropy(lg, y[:, i]) for i, lg in enumerate(logits))

    secs, _ = train_loop("judge", args.judge_steps, list(judge.parameters()), 2e-3, step)
    judge.eval().cpu()
    rng = np.random.default_rng(4)
    labels = random_labels(2000, rng)
    acc = judge_read(judge, real_images(labels, rng), labels)[0]
    path = os.path.join(args.work_dir, "judge.pt")
    torch.save(judge.state_dict(), path)
    return path, dict(judge_s=secs, judge_accuracy_on_data=acc)


@torch.no_grad()
def judge_read(judge, x, labels):
    """Alignment (all three attributes read as the prompt says) and the penultimate features."""
    feats, preds = [], []
    for i in range(0, len(x), 512):
        f, logits = judge(x[i:i + 512])
        feats.append(f)
        preds.append(torch.stack([lg.argmax(1) for lg in logits], 1))
    preds = torch.cat(preds).numpy()
    return float((preds == labels).all(1).mean()), torch.cat(feats).double()


def frechet(f1, f2):
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), with symmetric eigendecompositions."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = torch.cov(f1.T), torch.cov(f2.T)
    vals, vecs = torch.linalg.eigh(s1)
    r1 = vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T
    cross = torch.linalg.eigvalsh(r1 @ s2 @ r1).clamp(min=0).sqrt().sum()
    return float(((mu1 - mu2) ** 2).sum() + s1.trace() + s2.trace() - 2 * cross)


def load_judge(path):
    judge = Judge()
    judge.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return judge.eval()


# ------------------------------------------------------------------------------------------------------
# 4. distillation: flash_sd.py through its command line
# ------------------------------------------------------------------------------------------------------

def distill_command(args, teacher):
    """The toy's changes to flash_sd.py's defaults, each for a stated reason (README, "Toy reproduction")."""
    n = args.phase_steps
    return [sys.executable, os.path.join(ROOT, "flash_sd.py"),
            "--model", teacher, "--shards", shard_pattern(args), "--output_dir", os.path.join(args.work_dir, "run"),
            "--resolution", str(SIZE),  # the toy's images
            "--batch_size", str(args.batch_size),
            "--phase_steps", *map(str, n),
            "--num_teacher_steps", "16",  # K = 16 (PixArt's released value): the toy teacher converges by then
            "--distill_loss", "l2",  # LPIPS's VGG weights cannot be downloaded here
            "--lora_rank", "32", "--lora_alpha", "32",  # the toy UNet is 48-96 wide (SD1.5: 320-1280); alpha/r = 1 as SD1.5
            "--lr", str(args.lr), "--lr_disc", str(args.lr),  # a few thousand updates, not 10k at batch 64
            "--mixed_precision", "no",  # bf16 autocast runs ~6x slower than fp32 on these CPUs
            "--num_workers", "1", "--log_every", str(max(1, sum(n) // 20)),
            "--sample_every", str(sum(n)), "--checkpoint_every", str(max(1, sum(n) // 4)),
            "--validation_prompts", *[caption(*c) for c in COMBOS[::9]], "--overwrite", *shlex.split(args.distill_flags)]


def stage_distill(args, teacher):
    run = os.path.join(args.work_dir, "run")
    cmd = distill_command(args, teacher)
    if os.path.isdir(os.path.join(run, "checkpoints")) and not args.fresh:
        cmd = [c for c in cmd if c != "--overwrite"] + ["--resume", "latest"]  # an interrupted run continues
    print("+ " + " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    return run


# ------------------------------------------------------------------------------------------------------
# 5. the table: teacher at 32/8/4/2/1 steps with CFG, student at 4/2/1 steps without, same noise
# ------------------------------------------------------------------------------------------------------

def eval_set(n):
    """Fixed prompts (the 36 captions in turn), fixed initial noise, and data images with the same labels."""
    labels = np.array([COMBOS[i % len(COMBOS)] for i in range(n)])
    g = torch.Generator().manual_seed(1234)
    noise = torch.randn(n, 4, SIZE // 2, SIZE // 2, generator=g)
    real = torch.cat([real_images(labels, np.random.default_rng(5)), real_images(labels, np.random.default_rng(6))])
    return labels, noise, real, np.concatenate([labels, labels])


@torch.no_grad()
def generate(pipe, labels, noise, steps, guidance, batch=128):
    out = []
    for i in range(0, len(labels), batch):
        prompts = [caption(*lab) for lab in labels[i:i + batch]]
        g = torch.Generator().manual_seed(i)  # the LCM sampler's fresh noise between steps
        out.append(pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, latents=noise[i:i + batch],
                        generator=g, height=SIZE, width=SIZE, output_type="pt").images)
    return torch.cat(out).clamp(0, 1)


@torch.no_grad()
def generate_drawn_w(pipe, labels, noise, steps, w_range, batch=128):
    """The teacher as the student learns it (the fair reference): DPM-Solver++ with CFG, w drawn per image
    from the distillation's U[guidance_min, guidance_max], on the same prompts and initial noise as
    generate(), decoded as the pipeline decodes."""
    from diffusers import DPMSolverMultistepScheduler
    import flash_sd
    w = torch.empty(len(labels)).uniform_(*w_range, generator=torch.Generator().manual_seed(4321))
    sched = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++",
                                                    timestep_spacing="trailing", final_sigmas_type="zero")
    uncond = flash_sd.encode_text(pipe.tokenizer, pipe.text_encoder, [""], torch.device("cpu"))
    out = []
    for i in range(0, len(labels), batch):
        cond = flash_sd.encode_text(pipe.tokenizer, pipe.text_encoder, [caption(*lab) for lab in labels[i:i + batch]],
                                    torch.device("cpu"))
        x = noise[i:i + batch] * sched.init_noise_sigma
        sched.set_timesteps(steps)
        for tau in sched.timesteps:
            e = flash_sd.cfg_eps(pipe.unet, x, tau.expand(len(x)), cond, uncond.expand(len(x), -1, -1),
                                 w[i:i + batch].view(-1, 1, 1, 1))
            x = sched.step(e, tau, x).prev_sample
        out.append(pipe.vae.decode(x / pipe.vae.config.scaling_factor).sample / 2 + 0.5)
    return torch.cat(out).clamp(0, 1)


def stage_table(args, teacher, run, judge_path):
    from diffusers import DPMSolverMultistepScheduler, LCMScheduler, StableDiffusionPipeline
    torch.manual_seed(0)
    judge = load_judge(judge_path)
    labels, noise, real, real_labels = eval_set(args.eval_size)
    real_align, real_feats = judge_read(judge, real, real_labels)
    pipe = StableDiffusionPipeline.from_pretrained(teacher, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    cfg = pipe.scheduler.config
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(cfg, algorithm_type="dpmsolver++",
                                                             timestep_spacing="trailing", final_sigmas_type="zero")
    import flash_sd
    distill = flash_sd.parse_args(distill_command(args, teacher)[2:])
    w_range = (distill.guidance_min, distill.guidance_max)
    drawn = f"teacher, w ~ U[{w_range[0]:g}, {w_range[1]:g}]"  # the fair reference: w as the student learns it
    rows, images = [], {}
    configs = [("teacher", n, 2 * n) for n in (32, 8, 4, 2, 1)] + [(drawn, n, 2 * n) for n in (32, 16)]
    configs += [("student", n, n) for n in (4, 2, 1)]
    for who, steps, nfe in tqdm(configs, desc="table"):
        if (who, steps) == ("student", 4):  # the first student row: load the LoRA the way a user does
            pipe.load_lora_weights(run)
            pipe.scheduler = LCMScheduler.from_config(cfg, timestep_spacing="trailing")
        if who == drawn:
            x = generate_drawn_w(pipe, labels, noise, steps, w_range)
        else:
            x = generate(pipe, labels, noise, steps, args.guidance if who == "teacher" else 0.0)
        images[(who, steps)] = x
        align, feats = judge_read(judge, x * 2 - 1, labels)
        mse = float(((x - images[("teacher", 32)]) ** 2).mean())
        rows.append(dict(model=who, steps=steps, nfe=nfe, alignment=align, fd=frechet(feats, real_feats), mse_to_teacher32=mse))
    floor = frechet(real_feats[: len(labels)], real_feats[len(labels):])  # two data sets: the FD noise floor
    return rows, images, dict(data_alignment=real_align, fd_floor=floor), labels


def teacher_gate(args, teacher, judge_path):
    """The teacher must follow its prompts before anything is distilled from it."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
    judge = load_judge(judge_path)
    labels, noise, _, _ = eval_set(min(args.eval_size, 288))
    pipe = StableDiffusionPipeline.from_pretrained(teacher, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++",
                                                             timestep_spacing="trailing", final_sigmas_type="zero")
    align = judge_read(judge, generate(pipe, labels, noise, 32, args.guidance) * 2 - 1, labels)[0]
    return align


def markdown(rows, extra):
    lines = ["| model | steps | NFE | alignment (%) | Frechet distance | MSE to teacher 32 |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['steps']} | {r['nfe']} | {100 * r['alignment']:.1f} | {r['fd']:.2f} | "
                     f"{r['mse_to_teacher32']:.4f} |")
    lines.append(f"\nData images: alignment {100 * extra['data_alignment']:.1f} %, FD between two data sets "
                 f"{extra['fd_floor']:.2f} (the noise floor). NFE counts CFG as two evaluations.")
    return "\n".join(lines)


def save_grid(images, labels, path, n_rows=9):
    """A few evaluation prompts (rows) across the models (columns), upscaled to 128 px, labelled on top."""
    from PIL import ImageDraw
    from torchvision.transforms.functional import to_pil_image
    from torchvision.utils import make_grid
    cols = [("teacher", 32), ("teacher", 4), ("student", 4), ("student", 2), ("student", 1)]
    picks = list(range(0, len(labels), max(1, len(labels) // n_rows)))[:n_rows]
    x = torch.stack([images[c][i].float() for i in picks for c in cols])
    x = torch.nn.functional.interpolate(x, scale_factor=max(1, 128 // x.shape[-1]), mode="nearest")
    grid = to_pil_image(make_grid(x, nrow=len(cols), padding=0))
    page = Image.new("RGB", (grid.width, grid.height + 14), "white")
    page.paste(grid, (0, 14))
    for j, (w, s) in enumerate(cols):
        ImageDraw.Draw(page).text((j * x.shape[-1] + 2, 1), f"{w} {s} step{'s' * (s > 1)}", fill="black")
    page.save(path)


# ------------------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--work_dir", default=os.path.join(os.path.expanduser("~"), ".cache", "flash_toy"), help="cached stage outputs")
    a("--quick", action="store_true",
      help="every stage at smoke-test size, overriding the size flags (a few minutes; no quality claim)")
    a("--fresh", action="store_true", help="redo the stages even if their outputs are cached")
    a("--stages", default="data,teacher,judge,distill,table", help="comma-separated subset to run")
    a("--train_teacher", action="store_true", help="train teacher and judge here instead of using bench/toy_teacher")
    a("--device", default="cpu",
      help="device for training the teacher and judge (flash_sd.py takes a GPU itself when it sees one)")
    a("--data_size", type=int, default=8000, help="images in the shards")
    a("--num_shards", type=int, default=8)
    a("--teacher_pool", type=int, default=40000, help="distinct images the teacher and judge train on")
    a("--teacher_batch", type=int, default=256)
    a("--vae_steps", type=int, default=4000)
    a("--vae", default=None, help="a diffusers VAE folder to keep (e.g. bench/toy_teacher/model/vae) instead "
      "of training one")
    a("--unet_steps", type=int, default=20000)
    a("--judge_steps", type=int, default=3000)
    a("--teacher_seconds", type=float, default=None, help="cap the UNet's training time (steps cut to fit)")
    a("--guidance", type=float, default=5.0, help="teacher CFG scale in the gate and the table")
    a("--min_teacher_alignment", type=float, default=0.8, help="the gate on the teacher at 32 steps")
    a("--phase_steps", type=int, nargs=4, default=[500, 500, 500, 500], help="flash_sd.py generator updates per phase")
    a("--batch_size", type=int, default=32, help="flash_sd.py batch")
    a("--distill_flags", default="", help="more flash_sd.py flags, e.g. \"--backward_sim 0.5\"; a lone flag needs the =: "
      "--distill_flags=--dmd_gan_from_noise (they come last and win)")
    a("--lr", type=float, default=1e-4, help="flash_sd.py learning rate (LoRA and discriminator)")
    a("--eval_size", type=int, default=576, help="images per table row (the 36 captions, 16 seeds each)")
    args = p.parse_args(argv)
    unknown = set(args.stages.split(",")) - {"data", "teacher", "judge", "gate", "distill", "table"}
    if unknown:
        p.error(f"--stages: unknown {sorted(unknown)}; choose from data,teacher,judge,gate,distill,table")
    if args.quick:
        args.data_size, args.num_shards, args.teacher_pool, args.teacher_batch = 256, 2, 512, 32
        args.vae_steps, args.unet_steps, args.judge_steps = 4, 4, 4
        args.phase_steps, args.batch_size, args.eval_size = [1, 1, 1, 1], 4, 12
        args.work_dir = os.path.join(args.work_dir, "quick")  # never mixed with a full run's cache
    return args


def main(argv=None):
    args = parse_args(argv)
    stages = args.stages.split(",")
    os.makedirs(args.work_dir, exist_ok=True)
    times_path = os.path.join(args.work_dir, "times.json")
    times = json.load(open(times_path)) if os.path.exists(times_path) else {}

    def timed(name, fn, *a):
        t0 = time.time()
        out = fn(*a)
        times[name] = round(time.time() - t0, 1)
        print(f"[{name}] {times[name]:.0f} s", flush=True)
        json.dump(times, open(times_path, "w"), indent=1)
        return out

    def cached(path, name, fn, *a):
        if name in stages and (args.fresh or not os.path.exists(path)):
            return timed(name, fn, *a)
        return None

    teacher, judge = os.path.join(ASSETS, "model"), os.path.join(ASSETS, "judge.pt")
    if args.train_teacher:
        teacher, judge = os.path.join(args.work_dir, "teacher"), os.path.join(args.work_dir, "judge.pt")
    cached(os.path.join(args.work_dir, "shards"), "data", stage_data, args)
    if args.train_teacher:
        out = cached(teacher, "teacher", stage_teacher, args)
        if out:
            times.update({k: round(v, 1) for k, v in out[1].items()})
        out = cached(judge, "judge", stage_judge, args)
        if out:
            print(f"judge accuracy on data images: {100 * out[1]['judge_accuracy_on_data']:.1f} %")
            times.update(judge_accuracy_on_data=out[1]["judge_accuracy_on_data"])
        json.dump(times, open(times_path, "w"), indent=1)
    for path, what in ((teacher, "teacher"), (judge, "judge")):
        if {"gate", "distill", "table"} & set(stages) and not os.path.exists(path):
            raise SystemExit(f"toy.py: no {what} at {path}: run with --train_teacher (or restore bench/toy_teacher)")
    run = os.path.join(args.work_dir, "run")
    final = os.path.join(run, "pytorch_lora_weights.safetensors")
    if "gate" in stages or ("distill" in stages and (args.fresh or not os.path.exists(final))):
        align = timed("gate", teacher_gate, args, teacher, judge)
        print(f"teacher, 32 steps, CFG {args.guidance}: alignment {100 * align:.1f} %")
        if align < args.min_teacher_alignment and not args.quick:
            raise SystemExit(f"toy.py: the teacher follows only {100 * align:.1f} % of its prompts (needs "
                             f"{100 * args.min_teacher_alignment:.0f} %): retrain it longer (--train_teacher --unet_steps N)")
    cached(final, "distill", stage_distill, args, teacher)
    if "table" in stages:
        if not os.path.exists(final):
            raise SystemExit(f"toy.py: no distilled LoRA at {final}: run the distill stage first")
        rows, images, extra, labels = timed("table", stage_table, args, teacher, run, judge)
        table = markdown(rows, extra)
        print(table)
        with open(os.path.join(args.work_dir, "results.md"), "w") as f:
            f.write(table + "\n")
        with open(os.path.join(args.work_dir, "results.json"), "w") as f:
            json.dump(dict(rows=rows, **extra, times=times, quick=args.quick,
                           command=distill_command(args, teacher)[1:]), f, indent=1)
        save_grid(images, labels, os.path.join(args.work_dir, "grid.png"))
        print(f"results: {args.work_dir}/results.md, results.json, grid.png")
    return args


if __name__ == "__main__":
    main()
