"""Flash Diffusion for PixArt-alpha and PixArt-Sigma: distil the DiT into a 1-4 step LoRA student.

Chadebec et al., "Flash Diffusion: Accelerating Any Conditional Diffusion Model for Few Steps Image
Generation", arXiv 2406.02347. The student (transformer + LoRA) learns to reach in one step what
the teacher (the same transformer, LoRA disabled) reaches in K DPM-Solver++ steps with
classifier-free guidance, from start steps drawn from a Gaussian mixture that moves toward pure
noise over 4 phases; a distribution-matching (DMD) loss and an adversarial loss join after a
warm-up phase.

PixArt specifics: T5 text embeddings (alpha 120 tokens, Sigma 300) with their attention mask,
resolution and aspect-ratio conditioning fixed to the training resolution where the transformer
takes it (alpha at 1024 px; Sigma takes none), the transformer's 8 output channels
(epsilon, variance) of which the first 4 are used, the empty prompt through T5 as the
unconditional input, and a discriminator that reads the frozen teacher's epsilon prediction of the
re-noised sample.

Launch (defaults are the paper's PixArt settings; phase lengths count generator updates):
    # one GPU
    python flash_pixart.py --shards "data/{00000..00999}.tar" --output_dir runs/flash_pixart
    # one node, 8 GPUs
    torchrun --standalone --nproc_per_node=8 flash_pixart.py --shards "data/{00000..00999}.tar"
    # two nodes (the same command on each; $MASTER is the first node's address)
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_id=flash --rdzv_backend=c10d \
        --rdzv_endpoint=$MASTER:29500 flash_pixart.py --shards "data/{00000..00999}.tar"
Use the result with a stock PixArtAlphaPipeline or PixArtSigmaPipeline:
PeftModel.from_pretrained(pipe.transformer, output_dir), LCMScheduler (timestep_spacing="trailing"),
4 steps, guidance_scale=0. See README.md.
"""
import argparse
import contextlib
import errno
import json
import logging
import math
import os
import resource
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from diffusers import (AutoencoderKL, DiffusionPipeline, DPMSolverMultistepScheduler, LCMScheduler,
                       PixArtAlphaPipeline, PixArtSigmaPipeline, PixArtTransformer2DModel)
from peft import LoraConfig, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from PIL import Image, ImageDraw
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel as DDP
from torchvision.transforms.functional import to_pil_image
from torchvision.utils import make_grid
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm
from transformers import AutoTokenizer, T5EncoderModel

import common

# ----------------------------------------------------------------------------------------------
# the paper's PixArt settings (its released config); the flags take their defaults from here
# ----------------------------------------------------------------------------------------------
MODEL = "PixArt-alpha/PixArt-XL-2-1024-MS"  # PixArt-alpha at 1024 px
RESOLUTION = 1024  # training resolution (square)
BATCH_SIZE = 2  # images per GPU per generator update
NUM_TEACHER_STEPS = 16  # K: DPM-Solver++ steps of the teacher's full solve
PHASE_STEPS = [5000] * 4  # generator updates per phase
GUIDANCE = (2.0, 9.0)  # teacher CFG scale w ~ U[min, max], one per batch
DISTILL_WEIGHTS = [1.0, 1.0, 1.0, 1.0]  # lambda_dist per phase
DMD_WEIGHTS = [0.0, 0.3, 0.5, 0.7]  # lambda_dmd per phase
ADV_WEIGHTS = [0.0, 0.05, 0.1, 0.2]  # lambda_adv per phase
LR = 1e-5  # AdamW, constant, for the LoRA and for the discriminator head
LORA_RANK, LORA_ALPHA = 64, 8
LORA_INIT = True  # PEFT's default init: B = 0, the student starts as the teacher
# on PixArt-XL: q, k, v, out of attn1/attn2 and the feed-forward of every block; the patch conv
# (pos_embed.proj), proj_out, adaln_single.linear and the timestep, size and caption embedders.
# proj_in matches nothing.
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj",
                "ff.net.2", "proj", "linear", "linear_1", "linear_2"]
GAN_TIMESTEPS = [10, 250, 500, 750]  # noise levels the discriminator sees, one drawn per sample
MIN_AESTHETIC = 6.0  # keep samples with json aesthetic_score >= this
MAX_TOKENS = dict(alpha=120, sigma=300)  # T5 sequence length of PixArt-alpha and of PixArt-Sigma

DEFAULT_PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "a red fox in a snowy forest, golden hour",
    "a bowl of ramen on a wooden table, studio lighting",
    "a watercolor painting of a lighthouse on a cliff",
]
# the repeated blocks --compile compiles in place (one graph per class and shape, seconds each)
COMPILE_BLOCKS = ("BasicTransformerBlock",)
MAX_NONFINITE = 5  # non-finite losses in a row before training stops
NAME = "flash_pixart"  # the default output folder, the log, the progress bar, the ComfyUI file


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    # data and model
    a("--model", default=MODEL,
      help="hub id or local diffusers folder of PixArt-alpha or PixArt-Sigma (or a fine-tune)")
    a("--variant", default="auto", choices=["auto", "alpha", "sigma"],
      help="PixArt-alpha or PixArt-Sigma (auto: the model's pipeline class, else its VAE's scale)")
    a("--shards", nargs="+", required=True, help="webdataset shards: braces, globs, pipe: URLs")
    a("--output_dir", default=f"runs/{NAME}", help="metrics, samples, checkpoints, the LoRA")
    a("--resolution", type=positive_int, default=RESOLUTION, help="training size (square crop)")
    a("--batch_size", type=positive_int, default=BATCH_SIZE, help="images per GPU per update")
    a("--min_aesthetic", type=float, default=MIN_AESTHETIC, help="keep scores >= this; <0: off")
    a("--aesthetic_key", default="aesthetic_score", help="json key that --min_aesthetic reads")
    a("--num_workers", type=non_negative_int, default=4, help="data loading processes per GPU")
    # schedule: 4 phases (paper section 3.2)
    a("--phase_steps", type=non_negative_int, nargs=4, default=PHASE_STEPS,
      help="generator updates per phase")
    a("--max_steps", type=positive_int, default=None, help="stop here (none: the phases' sum)")
    a("--num_teacher_steps", type=teacher_steps, default=NUM_TEACHER_STEPS,
      help="K: DPM-Solver++ steps of the teacher's full solve (4 to 1000)")
    a("--timestep_distribution", default="mixture", choices=["mixture", "uniform", "gaussian"],
      help="start index over the K solver steps (uniform, gaussian: the paper's ablations)")
    a("--backward_sim", type=probability, default=0.0,
      help="probability that x_t for k > 0 comes from the student's own 4-step sampler (detached), "
      "not from data (DMD2's backward simulation; 0: the paper's recipe)")
    a("--guidance_min", type=float, default=GUIDANCE[0], help="CFG w ~ U[min, max], one per batch")
    a("--guidance_max", type=float, default=GUIDANCE[1], help="see --guidance_min")
    # losses
    a("--distill_loss", default="lpips", choices=["lpips", "l2", "l1"], help="student vs teacher")
    a("--distill_weights", type=float, nargs=4, default=DISTILL_WEIGHTS,
      help="lambda_dist per phase")
    a("--dmd_weights", type=float, nargs=4, default=DMD_WEIGHTS, help="lambda_dmd per phase")
    a("--adv_weights", type=float, nargs=4, default=ADV_WEIGHTS, help="lambda_adv per phase")
    a("--gan_loss", default="lsgan", choices=["lsgan", "hinge", "non_saturating"], help="GAN loss")
    a("--teacher_as_real", action="store_true", help="D's real samples: teacher outputs, not data")
    a("--dmd_gan_from_noise", action="store_true",
      help="DMD and GAN generator losses only on batches from pure noise (k = 0); D trains on all")
    a("--renoise", default="original", choices=["original", "true"],
      help="noise level of DMD's and D's inputs: the original code's (t on the K-step grid, else "
      "the grid's last step), or t's own")
    # optimisation
    a("--lr", type=positive_float, default=LR, help="AdamW learning rate of the LoRA (constant)")
    a("--lr_disc", type=positive_float, default=LR,
      help="AdamW learning rate of the discriminator head (constant)")
    a("--lora_rank", type=positive_int, default=LORA_RANK, help="LoRA rank r")
    a("--lora_alpha", type=positive_float, default=LORA_ALPHA, help="LoRA alpha (scale alpha / r)")
    a("--mixed_precision", default="bf16", choices=["bf16", "no"],
      help="bf16 autocast (frozen weights in bf16 on GPU)")
    a("--compile", action="store_true",
      help="torch.compile the transformer blocks in place (the first steps compile)")
    a("--gradient_checkpointing", action="store_true", help="trade compute for memory")
    a("--seed", type=int, default=0, help="global seed; rank r uses seed + r")
    # outputs
    a("--log_every", type=positive_int, default=50, help="updates between metrics lines")
    a("--sample_every", type=positive_int, default=1000, help="updates between validation grids")
    a("--checkpoint_every", type=positive_int, default=1000, help="updates between checkpoints")
    a("--keep_checkpoints", type=non_negative_int, default=3, help="newest kept (0: all)")
    a("--resume", default=None, help="'latest' or a checkpoints/step_NNNNNN folder")
    a("--overwrite", action="store_true", help="start a new run in an output_dir that holds one")
    a("--validation_prompts", nargs="+", default=DEFAULT_PROMPTS, help="the sample grids' prompts")
    return p.parse_args(argv)


def check_args(args):
    """This backbone's start-up checks of --model and --resolution, before any model loads; a
    UsageError names the flag and the fix (check_flags checks what every script checks)."""
    try:
        vae_cfg = AutoencoderKL.load_config(args.model, subfolder="vae")
        sched_cfg = DPMSolverMultistepScheduler.load_config(args.model, subfolder="scheduler")
        net_cfg = PixArtTransformer2DModel.load_config(args.model, subfolder="transformer")
    except Exception as e:
        layout = "a diffusers PixArt layout (vae/, transformer/, scheduler/)"
        raise model_error(args.model, layout, e) from e
    if sched_cfg.get("prediction_type", "epsilon") != "epsilon":  # x0 from v differs
        predicts = sched_cfg["prediction_type"]
        raise common.UsageError(f"--model {args.model}: its scheduler's prediction_type is "
                                f"{predicts}; this script distils epsilon-prediction models only")
    # the latent must split into patches; the stock pipeline (validation) wants multiples of 8
    factor = math.lcm(8, 2 ** (len(vae_cfg["block_out_channels"]) - 1) * net_cfg["patch_size"])
    if args.resolution % factor:
        nearest = max(factor, args.resolution // factor * factor)
        raise common.UsageError(f"--resolution {args.resolution}: must be a multiple of {factor} "
                                f"for this model (VAE downsampling, patch size), e.g. {nearest}")


# ----------------------------------------------------------------------------------------------
# the backbone: loading, text encoding, denoiser calls
# ----------------------------------------------------------------------------------------------

def build(args, device):
    """Everything a training step reads, loaded once. The student is the transformer with its LoRA;
    the teacher is the same transformer with the LoRA disabled (`teacher_mode`): one copy of the
    weights. The PixArt transformer has no diffusers LoRA loader: it becomes a PeftModel, the
    format users load it in."""
    bf16 = args.mixed_precision == "bf16" and device.type == "cuda"
    dtype = torch.bfloat16 if bf16 else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(args.model, subfolder="tokenizer")
    text_encoder = T5EncoderModel.from_pretrained(args.model, subfolder="text_encoder", dtype=dtype)
    vae = AutoencoderKL.from_pretrained(args.model, subfolder="vae", dtype=dtype)
    net = PixArtTransformer2DModel.from_pretrained(args.model, subfolder="transformer", dtype=dtype)
    for module in (text_encoder, vae, net):
        module.requires_grad_(False).eval().to(device)
    net = get_peft_model(net, LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha,
                                         init_lora_weights=LORA_INIT, target_modules=LORA_TARGETS))
    for p in net.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # trainable LoRA weights stay fp32 under bf16 autocast
    if args.gradient_checkpointing:  # the DiT, and the VAE decoder LPIPS backpropagates through
        net.enable_gradient_checkpointing()
        vae.enable_gradient_checkpointing()
    sched_config = DPMSolverMultistepScheduler.load_config(args.model, subfolder="scheduler")
    teacher_sched = DPMSolverMultistepScheduler.from_config(
        sched_config, algorithm_type="dpmsolver++", solver_order=2, timestep_spacing="trailing",
        final_sigmas_type="zero")
    variant, sizes = pixart_variant(args), net.get_base_model().use_additional_conditions
    # the unconditional input: the empty prompt
    uncond = encode_text(tokenizer, text_encoder, [""], args.resolution, device, sizes,
                         MAX_TOKENS[variant])
    # the discriminator head, sized from the teacher's epsilon prediction at this resolution
    latent = args.resolution // 2 ** (len(vae.config.block_out_channels) - 1)
    with torch.no_grad(), teacher_mode(net):
        z = torch.zeros(1, vae.config.latent_channels, latent, latent, device=device, dtype=dtype)
        t0 = torch.zeros(1, device=device, dtype=torch.long)
        f = denoise(net, z, t0, uncond)
    lpips = None
    if args.distill_loss == "lpips":
        lpips = common.make_lpips().to(device).requires_grad_(False).eval()
    return SimpleNamespace(
        device=device, tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, denoiser=net,
        uncond=uncond, sizes=sizes, variant=variant, max_tokens=MAX_TOKENS[variant],
        teacher_sched=teacher_sched, sched_config=sched_config,
        lpips=lpips, alphas_cumprod=teacher_sched.alphas_cumprod.to(device, torch.float32),
        disc=make_discriminator(f.shape[1], f.shape[-1]).to(device),
        decode=lambda z: vae.decode(z / vae.config.scaling_factor).sample,
        start_probs=[common.start_index_probs(args.num_teacher_steps, p, args.timestep_distribution)
                     for p in common.MODE_PROBS],
        extra=None)  # per-sample inputs the data loader adds beside image and caption: none here


@torch.no_grad()
def encode_text(tokenizer, text_encoder, prompts, resolution, device, sizes=True, max_tokens=120):
    """PixArt conditioning, batch-first: T5 states (B, max_tokens, 4096) and their attention mask,
    as the stock pipeline makes them (prompts lower-cased and stripped), plus, with `sizes` (the
    transformer's use_additional_conditions: PixArt-alpha at 1024 px), the resolution and
    aspect-ratio conditioning."""
    prompts = [p.lower().strip() for p in prompts]
    tokens = tokenizer(prompts, padding="max_length", max_length=max_tokens, truncation=True,
                       add_special_tokens=True, return_tensors="pt")
    mask = tokens.attention_mask.to(device)
    text = text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]
    if not sizes:
        return dict(text=text, mask=mask)
    B = len(prompts)
    ratio = torch.ones(B, 1, device=device, dtype=text.dtype)
    size = torch.tensor([[resolution, resolution]] * B, device=device, dtype=text.dtype)
    return dict(text=text, mask=mask, aspect_ratio=ratio, resolution=size)


def pixart_variant(args):
    """"alpha" or "sigma": --variant, else the pipeline class in the model's model_index.json, else
    the VAE's scaling factor (PixArt-Sigma uses SDXL's VAE, 0.13025; PixArt-alpha SD's, 0.18215)."""
    if args.variant != "auto":
        return args.variant
    with contextlib.suppress(OSError, ValueError):
        pipeline = DiffusionPipeline.load_config(args.model).get("_class_name", "")
        if pipeline in ("PixArtSigmaPipeline", "PixArtAlphaPipeline"):
            return "sigma" if pipeline == "PixArtSigmaPipeline" else "alpha"
    scale = AutoencoderKL.load_config(args.model, subfolder="vae").get("scaling_factor")
    return "sigma" if abs(scale - 0.13025) < 1e-6 else "alpha"


def cat_cond(*conds):
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}


def expand_cond(c, B):
    return {k: v.expand(B, *v.shape[1:]) for k, v in c.items()}


def denoise(net, x, t, c):
    """epsilon prediction in fp32 (the first 4 of the 8 output channels; the others are the
    variance). The transformer takes the timestep only as a keyword."""
    added = dict(resolution=c.get("resolution"), aspect_ratio=c.get("aspect_ratio"))
    out = net(x, encoder_hidden_states=c["text"], encoder_attention_mask=c["mask"], timestep=t,
              added_cond_kwargs=added).sample
    return out[:, : x.shape[1]].float()


def cfg_eps(net, x, t, cond, uncond, w):
    """Classifier-free guidance in one batched forward: cat[uncond, cond], then chunk(2)."""
    e = denoise(net, torch.cat([x, x]), torch.cat([t, t]), cat_cond(uncond, cond))
    e_u, e_c = e.chunk(2)
    return e_u + w * (e_c - e_u)


@contextlib.contextmanager
def teacher_mode(net):
    """LoRA off: the transformer is the frozen teacher."""
    with net.disable_adapter():
        yield


@torch.no_grad()
def teacher_solve(m, x_t, k, cond, uncond, w):
    """K-step DPM-Solver++ with CFG from ts[k] down to 0 (the caller's set_timesteps(K) also resets
    the solver's multistep state)."""
    with teacher_mode(m.denoiser):
        x = x_t
        for tau in m.teacher_sched.timesteps[k:]:
            e = cfg_eps(m.denoiser, x, tau.expand(len(x)), cond, uncond, w)
            x = m.teacher_sched.step(e, tau, x).prev_sample
    return x.float()


@torch.no_grad()
def student_sample(m, z0, k, cond, K):
    """--backward_sim (DMD2's backward simulation): the student's own 4-step sampler from pure
    noise down to the last 4-step grid level above ts[k], fresh noise between steps. Returns x0."""
    ts, abar, B = m.teacher_sched.timesteps, m.alphas_cumprod, len(z0)
    x = torch.randn_like(z0)
    for j in range(0, k, K // 4):
        tj = ts[j].expand(B)
        x0 = common.lcm_x0(x, denoise(m.denoiser, x, tj, cond), tj, abar)
        if j + K // 4 < k:
            x = common.renoise(x0, torch.randn_like(z0), ts[j + K // 4].expand(B), abar)
    return x0


def make_discriminator(ch, size):
    """PixArt head (the released config) on the teacher's epsilon prediction (4 x 128 x 128 at
    1024 px): five k4 s2 convs (64 ... 1024 channels, GroupNorm and SiLU) to 4x4, then one logit.
    Smaller maps skip the strided convs that would shrink them below 4x4 (k3 s1 instead) and end
    in a logit map."""
    layers, c_in = [], ch
    for i, c_out in enumerate((64, 128, 256, 512, 1024)):
        strided = size >= 8
        conv = (4, 2, 1) if strided else (3, 1, 1)  # kernel, stride, padding
        layers.append(nn.Conv2d(c_in, c_out, *conv, bias=False))
        layers += [nn.SiLU()] if i == 0 else [nn.GroupNorm(4, c_out), nn.SiLU()]
        size, c_in = size // 2 if strided else size, c_out
    head = nn.Conv2d(c_in, 1, min(4, size), 1, 0, bias=False)
    return nn.Sequential(*layers, head, nn.Flatten())


# ----------------------------------------------------------------------------------------------
# one training step (paper section 3, Algorithm 1)
# ----------------------------------------------------------------------------------------------

def train_step(m, student, disc, batch, step, args):
    """One batch: one forward, then the generator's and the discriminator's backward; the loop steps
    the optimizers. `student` and `disc` are the DDP-wrapped transformer and head (the plain ones in
    one process). Returns {loss name: detached tensor}."""
    dev, abar = m.device, m.alphas_cumprod
    bf16 = args.mixed_precision == "bf16"
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16)
    phase = common.phase_of(step, args.phase_steps)
    B = batch["pixel_values"].shape[0]

    # 1. data: latents and text conditioning
    with torch.no_grad(), autocast:
        pixels = batch["pixel_values"].to(dev, non_blocking=True)
        z0 = m.vae.encode(pixels).latent_dist.sample().float() * m.vae.config.scaling_factor
        cond = encode_text(m.tokenizer, m.text_encoder, batch["text"], args.resolution, dev,
                           m.sizes, m.max_tokens)
    uncond = expand_cond(m.uncond, B)

    # 2. start index k from the phase's mixture; x_t on the teacher's trailing grid (noise at k = 0)
    K = args.num_teacher_steps
    m.teacher_sched.set_timesteps(K, device=dev)  # also resets the multistep solver's state
    k = common.sample_start_index(m.start_probs[phase])
    t = m.teacher_sched.timesteps[k].expand(B)
    eps = torch.randn_like(z0)
    x_t = eps if k == 0 else common.renoise(z0, eps, t, abar)
    if k > 0 and args.backward_sim > 0 and torch.rand(()) < args.backward_sim:
        with autocast:  # from the student's own outputs, not data
            x_t = common.renoise(student_sample(m, z0, k, cond, K), eps, t, abar)

    # 3. student: one step, x0 from its epsilon with the LCM boundary scalings
    with autocast:
        eps_s = denoise(student, x_t, t, cond)
    x_hat = common.lcm_x0(x_t, eps_s, t, abar)

    # 4. teacher: solve from ts[k] to 0 with CFG, w ~ U[g_min, g_max] once per batch
    w = float(torch.empty(()).uniform_(args.guidance_min, args.guidance_max))
    with autocast:
        x_T = teacher_solve(m, x_t, k, cond, uncond, w)

    # 5. generator losses
    l_dist, l_dmd = args.distill_weights[phase], args.dmd_weights[phase]
    l_adv = args.adv_weights[phase]
    if k > 0 and args.dmd_gan_from_noise:  # they steer the 1-step output only; D still trains
        l_dmd, l_adv = 0.0, 0.0
    zero = torch.zeros((), device=dev)
    losses = dict(distill=zero, dmd=zero, adv=zero)
    with autocast:
        if l_dist > 0:  # 5a. distillation: one student step vs the teacher's K-step solve
            losses["distill"] = common.distill_loss(x_hat, x_T, args.distill_loss, m.decode,
                                                    m.lpips)
        if l_dmd > 0:  # 5b. DMD: the teacher with CFG is the real score, the student the fake score
            t2 = torch.randint(0, len(abar), (B,), device=dev)
            t2_noise = common.renoise_level(t2, m.teacher_sched.timesteps, args.renoise)
            y = common.renoise(x_hat.detach(), torch.randn_like(x_hat), t2_noise, abar)
            w2 = float(torch.empty(()).uniform_(args.guidance_min, args.guidance_max))
            with torch.no_grad():
                with teacher_mode(m.denoiser):
                    e_real = cfg_eps(m.denoiser, y, t2, cond, uncond, w2)
                e_fake = denoise(m.denoiser, y, t2, cond)
            losses["dmd"] = common.dmd_loss(x_hat, y, e_real, e_fake, abar[t2])
        # 5c. GAN: the frozen teacher's epsilon of re-noised fake and real latents, same noise
        levels = torch.tensor(GAN_TIMESTEPS, device=dev)
        s = levels[torch.randint(0, len(GAN_TIMESTEPS), (B,), device=dev)]
        s_noise = common.renoise_level(s, m.teacher_sched.timesteps, args.renoise)
        n = torch.randn_like(x_hat)
        real = x_T if args.teacher_as_real else z0
        fake_in = common.renoise(x_hat if l_adv > 0 else x_hat.detach(), n, s_noise, abar)
        # the real half needs no gradient: run apart, it saves no activations for the backward
        with torch.no_grad(), teacher_mode(m.denoiser):
            real_in = common.renoise(real, n, s_noise, abar)
            f_real = denoise(m.denoiser, real_in, s, cond).float()
        # checkpointing would recompute the fake half in the generator's backward, LoRA back on:
        # then the gradient w.r.t. its input is taken here, LoRA off, and carried into that one
        ckpt, carried = l_adv > 0 and m.denoiser.is_gradient_checkpointing, zero
        fake = fake_in.detach().requires_grad_() if ckpt else fake_in
        with torch.set_grad_enabled(l_adv > 0), teacher_mode(m.denoiser):
            f_fake = denoise(m.denoiser, fake, s, cond).float()
            if l_adv > 0:
                m.disc.requires_grad_(False)  # D is not trained by the generator's loss
                losses["adv"] = common.gan_g_loss(m.disc(f_fake).float(), args.gan_loss)
            if ckpt:  # d/d(fake_in) of (fake_in * g).sum() is g: the same update
                g = torch.autograd.grad(l_adv * losses["adv"], fake)[0]
                carried, losses["adv"] = (fake_in * g).sum(), losses["adv"].detach()
    loss_g = l_dist * losses["distill"] + l_dmd * losses["dmd"] + l_adv * losses["adv"]
    (loss_g + carried).backward()
    m.disc.requires_grad_(True)

    # 6. discriminator on the detached fake (and real) features, in every phase
    with autocast:
        logits_real, logits_fake = disc(torch.cat([f_real, f_fake]).detach()).float().chunk(2)
        losses["disc"] = common.gan_d_loss(logits_real, logits_fake, args.gan_loss)
    losses["disc"].backward()
    losses.update(loss_g=loss_g, t=t[0].float(), w=torch.tensor(w, device=dev))
    return {name: v.detach() for name, v in losses.items()}


# ----------------------------------------------------------------------------------------------
# validation and export
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def sample_grid(m, args, step):
    """Teacher (DPM-Solver++, 20 steps, CFG 4.5: the stock pipeline's defaults) beside the student
    (LCM, 1/2/4 steps, no CFG), on the validation prompts with a fixed generator; rows are prompts.
    Returns the PNG's path."""
    Pipeline = PixArtSigmaPipeline if m.variant == "sigma" else PixArtAlphaPipeline
    pipe = Pipeline(
        vae=m.vae, text_encoder=m.text_encoder, tokenizer=m.tokenizer, transformer=m.denoiser,
        scheduler=LCMScheduler.from_config(m.sched_config, timestep_spacing="trailing"))
    pipe.set_progress_bar_config(disable=True)
    bf16 = args.mixed_precision == "bf16"
    autocast = torch.autocast(m.device.type, dtype=torch.bfloat16, enabled=bf16)

    def run(steps, guidance):
        g = torch.Generator(m.device).manual_seed(args.seed)
        with autocast:  # captions lower-cased and stripped, as in training (clean_caption off)
            return pipe(args.validation_prompts, num_inference_steps=steps, guidance_scale=guidance,
                        generator=g, height=args.resolution, width=args.resolution,
                        use_resolution_binning=False, clean_caption=False,
                        max_sequence_length=m.max_tokens, output_type="pt").images.float().cpu()

    columns = {f"student {n} step{'s' * (n > 1)}": run(n, 0.0) for n in (1, 2, 4)}
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(m.sched_config,
                                                             algorithm_type="dpmsolver++")
    with teacher_mode(m.denoiser):
        columns = {"teacher 20 steps": run(20, 4.5), **columns}
    images = torch.stack(list(columns.values()), 1).flatten(0, 1)  # prompt-major: a row per prompt
    if images.shape[-1] < 128:  # tiny models: upscaled so the pictures and the labels can be seen
        images = F.interpolate(images, scale_factor=128 // images.shape[-1], mode="nearest")
    grid = to_pil_image(make_grid(images, nrow=len(columns), padding=0))
    page = Image.new("RGB", (grid.width, grid.height + 14), "white")
    page.paste(grid, (0, 14))
    for j, label in enumerate(columns):
        ImageDraw.Draw(page).text((j * images.shape[-1] + 2, 1), label, fill="black")
    path = os.path.join(args.output_dir, "samples", f"step_{step:06d}.png")
    page.save(path)
    return path


def export_lora(net, out_dir):
    """A PEFT adapter folder (adapter_config.json with rank and alpha, adapter_model.safetensors)
    that PeftModel.from_pretrained(pipe.transformer, out_dir) loads into a stock
    PixArtAlphaPipeline or PixArtSigmaPipeline; and flash_pixart_comfyui.safetensors for ComfyUI
    (comfyui_state_dict). Returns the folder's path: the adapter is the folder, not one file."""
    net.save_pretrained(out_dir)
    save_file(comfyui_state_dict(net), os.path.join(out_dir, f"{NAME}_comfyui.safetensors"))
    return out_dir


def comfyui_state_dict(net):
    """The LoRA in the form ComfyUI maps onto its PixArt model: transformer.<diffusers module
    path>.lora_down.weight (PEFT's lora_A), .lora_up.weight (lora_B) and .alpha, the trained alpha
    (ComfyUI takes alpha = r where a module has no .alpha, 8x too strong at the default rank 64,
    alpha 8). Conv LoRA keeps its 4-D shapes."""
    alpha = float(net.peft_config["default"].lora_alpha)
    parts = {"A.weight": "lora_down.weight", "B.weight": "lora_up.weight"}
    out = {}
    for k, v in get_peft_model_state_dict(net).items():
        path, part = k.removeprefix("base_model.model.").rsplit(".lora_", 1)  # PeftModel's prefix
        out[f"transformer.{path}.{parts[part]}"] = v.contiguous()
        out[f"transformer.{path}.alpha"] = torch.tensor(alpha)
    return out


# ----------------------------------------------------------------------------------------------
# run plumbing: the same text in every flash_*.py (tests/test_plumbing.py holds it so)
# ----------------------------------------------------------------------------------------------

def checked(kind, ok, rule):
    """An argparse type: kind(text), refused with `rule` unless ok(value)."""
    def parse(text):
        if not ok(value := kind(text)):
            raise argparse.ArgumentTypeError(f"{text}: {rule}")
        return value
    parse.__name__ = kind.__name__  # argparse: "invalid int value" for text that is no number
    return parse


positive_int = checked(int, lambda v: v > 0, "must be positive")
positive_float = checked(float, lambda v: v > 0, "must be positive")
non_negative_int = checked(int, lambda v: v >= 0, "must not be negative")
probability = checked(float, lambda v: 0 <= v <= 1, "a probability: between 0 and 1")
teacher_steps = checked(int, lambda v: 4 <= v <= 1000, "K must be between 4 and 1000")  # 4 modes


def check_flags(args):
    """What every script refuses before a model loads (the flags' ranges are their types)."""
    if args.guidance_min > args.guidance_max:
        raise common.UsageError("--guidance_min must not exceed --guidance_max")
    if sum(args.phase_steps) == 0:
        raise common.UsageError("--phase_steps: four non-negative batch counts with a positive sum")
    for p, n in enumerate(args.phase_steps):
        if n and max(args.distill_weights[p], args.dmd_weights[p], args.adv_weights[p]) <= 0:
            raise common.UsageError(f"phase {p} has no positive loss weight: raise one of "
                                    "--distill_weights, --dmd_weights, --adv_weights for it")
    if any(not p.strip() for p in args.validation_prompts):
        raise common.UsageError("--validation_prompts: an empty prompt; give each prompt as a "
                                "non-empty quoted string")
    common.expand_shards(args.shards)


def one_line(e):
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def model_error(model, layout, e):
    """The UsageError for a --model whose configs do not load: a failed download, a wrong layout."""
    if os.path.isdir(model):
        return common.UsageError(f"--model {model}: cannot read {layout} there: {one_line(e)}")
    return common.UsageError(f"--model {model}: not a local folder, and the Hugging Face Hub could "
                             "not provide it; `hf download ID --local-dir DIR`, then pass DIR")


def checkpoints(output_dir):
    """The complete checkpoint folders, oldest first (step_NNNNNN.tmp is an unfinished write)."""
    root = os.path.join(output_dir, "checkpoints")
    names = os.listdir(root) if os.path.isdir(root) else []
    names = [n for n in names if n.startswith("step_") and n[5:].isdigit()]
    folders = [os.path.join(root, n) for n in sorted(names, key=lambda n: int(n[5:]))]
    return [f for f in folders if os.path.isfile(os.path.join(f, "training_state.pt"))]


def find_resume(args):
    """The checkpoints to resume from, newest first; none for a new run, which must not mix into an
    old one. The output folder must be writable."""
    out, found = args.output_dir, checkpoints(args.output_dir)[::-1]
    if os.path.isfile(out):
        raise common.UsageError(f"--output_dir {out}: a file, not a folder; choose another")
    try:
        os.makedirs(out, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as e:
        raise common.UsageError(f"--output_dir {out}: cannot write there ({e.strerror}); choose "
                                "a writable folder") from None
    if args.resume == "latest" and not found:
        raise common.UsageError(f"--resume latest: no checkpoint in {out}/checkpoints; drop "
                                "--resume to start a new run")
    given = args.resume not in (None, "latest")
    if given and not os.path.isfile(os.path.join(args.resume, "training_state.pt")):
        raise common.UsageError(f"--resume {args.resume}: no training_state.pt there; give a "
                                "checkpoints/step_NNNNNN folder or 'latest'")
    if args.resume:
        return found if args.resume == "latest" else [args.resume]  # newest first: main falls back
    if found and not args.overwrite:
        raise common.UsageError(f"--output_dir {out} already holds a run; pass --resume latest to "
                                "continue it, --overwrite to start over there, or choose another")
    if os.path.exists(os.path.join(out, "metrics.jsonl")) and not args.overwrite:
        raise common.UsageError(f"--output_dir {out} holds a run that wrote no checkpoint; pass "
                                "--overwrite to start over there, or choose another --output_dir")
    return []


def setup(args, argv):
    """torchrun sets RANK: one process per device (nccl on CUDA, gloo on CPU); else one process.
    Rank 0 prepares the output folder and logs to the terminal and log.txt; the others are quiet."""
    cuda, ddp = torch.cuda.is_available(), "RANK" in os.environ
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if ddp:
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    for name in ("checkpoints", "samples", "metrics.jsonl", "log.txt") if rank == 0 else ():
        path = os.path.join(args.output_dir, name)
        if args.overwrite and not args.resume and os.path.isdir(path):
            shutil.rmtree(path)  # --overwrite: the earlier run's outputs go
        if args.overwrite and not args.resume and os.path.isfile(path):
            os.remove(path)
        if "." not in name:
            os.makedirs(path, exist_ok=True)
    barrier()  # the other ranks wait for the folders
    log = logging.getLogger(NAME)
    log.handlers = [logging.NullHandler()]
    log.propagate = False
    log.setLevel(logging.DEBUG)
    if rank == 0:
        log.handlers = [logging.StreamHandler(), logging.FileHandler(f"{args.output_dir}/log.txt")]
        log.handlers[0].setLevel(logging.INFO)  # tracebacks: log.txt only
    for h in log.handlers:
        h.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", "%H:%M:%S"))
    log.info(f"command: {shlex.join([sys.argv[0], *(sys.argv[1:] if argv is None else argv)])}")
    log.info(f"flags: {json.dumps(vars(args))}")
    return rank, world_size, device, log


def barrier():
    if dist.is_initialized():
        dist.barrier()


def compile_blocks(net):
    """--compile, regional: each repeated block compiled in place, so saved keys carry no prefix."""
    blocks = [b for b in net.modules() if type(b).__name__ in COMPILE_BLOCKS]
    if not blocks:
        raise common.UsageError(f"--compile: no {' or '.join(COMPILE_BLOCKS)} in this model; name "
                                "its repeated block classes in COMPILE_BLOCKS")
    for block in blocks:
        block.compile(dynamic=False)
    # every compiled block shares one frame (Module._call_impl): room for each (class, shape, grad
    # mode, LoRA on/off) graph, past which dynamo would silently fall back to eager
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, 256)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 1024)


def resume(resume_from, m, opt_g, opt_d, args, world_size, log):
    """Loads the newest checkpoint that loads (naming each that does not) into the LoRA, the head
    and both optimizers; returns (step, nonfinite). The model and the LoRA's shape and scale must
    match; other flags may change, and the log says which did."""
    for folder in resume_from:
        try:
            state = torch.load(f"{folder}/training_state.pt", map_location="cpu", weights_only=True)
            break
        except Exception as e:
            log.info(f"--resume: {folder}/training_state.pt does not load ({one_line(e)}); "
                     "trying the next newest")
    else:
        raise common.RunError(f"--resume: no checkpoint loads ({', '.join(resume_from)}); start "
                              "over with --overwrite, or give a readable one with --resume PATH")
    missing = [k for k in ("step", "config", "lora", "disc", "opt_g", "opt_d") if k not in state]
    if missing:
        raise common.RunError(f"--resume: {folder} has no {', '.join(missing)}: not a checkpoint "
                              f"of {NAME}.py; resume from another, or start over with --overwrite")
    for flag in ("model", "lora_rank", "lora_alpha"):
        if state["config"].get(flag) != getattr(args, flag):
            saved, now = state["config"].get(flag), getattr(args, flag)
            raise common.UsageError(f"--resume: the checkpoint has --{flag} {saved}, this run "
                                    f"{now}; resume with the same value")
    set_peft_model_state_dict(m.denoiser, state["lora"])
    m.disc.load_state_dict(state["disc"])
    for opt, saved, lr in ((opt_g, state["opt_g"], args.lr), (opt_d, state["opt_d"], args.lr_disc)):
        opt.load_state_dict(saved)
        opt.param_groups[0]["lr"] = lr  # the command line wins over the saved learning rate
    # versions before world_size was saved: unknown (None); the nonfinite count is only logged
    saved = dict(state["config"], world_size=state.get("world_size"))
    now = dict(vars(args), world_size=world_size)
    for run in (saved, now):
        run["global_batch"] = run["world_size"] * run["batch_size"] if run["world_size"] else None
    changed = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
    changed = {k: v for k, v in changed.items() if k not in ("resume", "overwrite")}
    log.info(f"resumed from {folder} at step {state['step']}; changed (saved, now): {changed}")
    return state["step"], state.get("nonfinite", 0)


@contextlib.contextmanager
def stop_signals():
    """SIGTERM (torchrun, SLURM) and Ctrl-C set the yielded event: the loop finishes its step, the
    ranks agree, a checkpoint is written. A second Ctrl-C stops at once."""
    stop = threading.Event()

    def on_signal(signum, frame):
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def any_rank(device, *flags):
    """Whether any rank raised each flag: one small all-reduce (the loop's one host sync)."""
    flags = torch.stack([torch.as_tensor(f, device=device) for f in flags]).float()
    if dist.is_initialized():
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return [bool(f) for f in flags.tolist()]


def save_checkpoint(m, opt_g, opt_d, args, step, nonfinite, world_size, log):
    """Rank 0: checkpoints/step_NNNNNN written under a temporary name, read back, renamed; then the
    oldest past --keep_checkpoints removed. Returns None, or why the write failed."""
    final = os.path.join(args.output_dir, "checkpoints", f"step_{step:06d}")
    tmp = final + ".tmp"
    lora = get_peft_model_state_dict(m.denoiser)
    state = dict(step=step, nonfinite=nonfinite, config=vars(args), world_size=world_size,
                 lora=lora, disc=m.disc.state_dict(), opt_g=opt_g.state_dict(),
                 opt_d=opt_d.state_dict())
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        torch.save(state, os.path.join(tmp, "training_state.pt"))
        export_lora(m.denoiser, tmp)
        torch.load(os.path.join(tmp, "training_state.pt"), mmap=True, weights_only=True)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(os.path.dirname(final)).free
        need = tensor_bytes(state) + tensor_bytes(lora)  # the state and the exported LoRA
        cause = one_line(e)
        if getattr(e, "errno", None) == errno.ENOSPC or free < need:
            cause = f"no space left on device: {free / 1e6:.1f} MB free, about {need / 1e6:.1f} MB"
            cause += " needed"
        return (f"checkpoint {final} could not be written ({cause}); its .tmp folder was removed "
                "and the earlier checkpoints are intact: fix the cause, then --resume latest")
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    keep = args.keep_checkpoints
    for old in checkpoints(args.output_dir)[:-keep] if keep else []:
        shutil.rmtree(old, ignore_errors=True)
    log.info(f"checkpoint at step {step}")
    return None


def tensor_bytes(x):
    """The bytes of the tensors in a state of nested dicts, lists and tuples."""
    if isinstance(x, dict):
        x = list(x.values())
    if isinstance(x, (list, tuple)):
        return sum(tensor_bytes(v) for v in x)
    return x.numel() * x.element_size() if torch.is_tensor(x) else 0


def log_metrics(sums, n, seconds, step, nonfinite, loader, args, device, log, bar):
    """One metrics line (metrics.jsonl, the log, the progress bar): each loss averaged over the last
    n steps and over the ranks, the data counters summed over the ranks, it/s and peak memory."""
    names, counts = sorted(sums), dict(sorted(loader.counts.items()))
    avg = torch.stack([sums[k].float() for k in names]) / n
    seen = torch.tensor([float(v) for v in counts.values()], device=device)
    if dist.is_initialized():
        dist.all_reduce(avg)
        dist.all_reduce(seen)
        avg /= dist.get_world_size()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # on a GPU, the GPU's
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    phase = common.phase_of(step - 1, args.phase_steps)
    losses = dict(zip(names, avg.tolist()))
    record = dict(step=step, phase=phase, K=args.num_teacher_steps, **losses, it_per_s=n / seconds,
                  peak_mem_gb=peak / 2 ** 30, nonfinite=nonfinite,
                  data=dict(zip(counts, map(int, seen.tolist()))))
    if not dist.is_initialized() or dist.get_rank() == 0:
        with open(os.path.join(args.output_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
    log.info(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                      for k, v in record.items()))
    bar.set_postfix(g=f"{record['loss_g']:.4f}", d=f"{record['disc']:.4f}")


def main(argv=None):
    args = parse_args(argv)
    check_flags(args)
    check_args(args)
    resume_from = find_resume(args)
    rank, world_size, device, log = setup(args, argv)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed)  # the LoRA and the head start identical on every rank

    m = build(args, device)
    if args.compile:
        compile_blocks(m.denoiser)
    # DDP wraps only what trains: the student's calls (its LoRA gradients) and the head
    ddp = dict(device_ids=[device.index] if device.type == "cuda" else None)
    student = DDP(m.denoiser, **ddp) if world_size > 1 else m.denoiser
    disc = DDP(m.disc, **ddp) if world_size > 1 else m.disc
    lora = [p for p in m.denoiser.parameters() if p.requires_grad]
    fused = dict(fused=True) if device.type == "cuda" else {}
    opt_g = torch.optim.AdamW(lora, lr=args.lr, **fused)
    opt_d = torch.optim.AdamW(m.disc.parameters(), lr=args.lr_disc, **fused)
    n_lora, n_disc = (sum(p.numel() for p in ps) / 1e6 for ps in (lora, m.disc.parameters()))
    log.info(f"LoRA {n_lora:.2f}M + discriminator {n_disc:.2f}M trainable parameters; "
             f"{world_size} process(es) on {device.type}")
    step, nonfinite = 0, 0
    if resume_from:
        step, nonfinite = resume(resume_from, m, opt_g, opt_d, args, world_size, log)
    # each rank draws its own noise; a resumed run draws new noise and reads new samples
    torch.manual_seed(args.seed + rank + 100_003 * step)
    total = min(args.max_steps or sum(args.phase_steps), sum(args.phase_steps))
    loader = common.make_loader(args.shards, args.resolution, args.batch_size, args.num_workers,
                                args.min_aesthetic, seed=args.seed + 100_003 * step, rank=rank,
                                world_size=world_size, aesthetic_key=args.aesthetic_key,
                                extra=m.extra)
    bar = tqdm(total=total, initial=step, disable=rank != 0, desc=NAME, dynamic_ncols=True)
    sums, n_sums, in_a_row, t_log = {}, 0, 0, time.time()
    data = iter(loader)
    with (stop_signals() as stop_requested, contextlib.closing(loader), bar,
          logging_redirect_tqdm(loggers=[log])):  # log lines above the progress bar
        while step < total:
            losses = train_step(m, student, disc, next(data), step, args)
            # 7. one all-reduce: a non-finite loss on any rank, a stop signal on any rank
            finite = torch.isfinite(losses["loss_g"]) & torch.isfinite(losses["disc"])
            bad, stop = any_rank(device, ~finite, stop_requested.is_set())
            if bad:  # both updates skipped
                nonfinite, in_a_row = nonfinite + 1, in_a_row + 1
                log.info(f"step {step}: non-finite loss, update skipped ({in_a_row} in a row)")
            else:
                opt_g.step()
                opt_d.step()
                step, in_a_row, n_sums = step + 1, 0, n_sums + 1
                sums = {name: sums.get(name, 0) + v for name, v in losses.items()}
                bar.update()
            opt_g.zero_grad(set_to_none=True)
            opt_d.zero_grad(set_to_none=True)
            if in_a_row >= MAX_NONFINITE:  # stop, naming the last good checkpoint
                found = checkpoints(args.output_dir)
                where = "no checkpoint was written yet"
                if found:
                    where = f"the last good checkpoint is {found[-1]}"
                hint = "Try a lower --lr, --mixed_precision no, or check the data."
                raise common.RunError(f"{MAX_NONFINITE} non-finite losses in a row at step {step}; "
                                      f"{where}. {hint}")
            done = step == total
            if not bad and (step % args.log_every == 0 or done):
                seconds = time.time() - t_log
                log_metrics(sums, n_sums, seconds, step, nonfinite, loader, args, device, log, bar)
                sums, n_sums, t_log = {}, 0, time.time()
            if not bad and (step % args.sample_every == 0 or done):
                if rank == 0:
                    log.info(f"samples: {sample_grid(m, args, step)}")
                barrier()
            if stop or not bad and (step % args.checkpoint_every == 0 or done):
                failed = None
                if rank == 0:
                    failed = save_checkpoint(m, opt_g, opt_d, args, step, nonfinite, world_size,
                                             log)
                if any_rank(device, failed is not None)[0]:  # also the barrier after the write
                    raise common.RunError(failed or "rank 0 could not write the checkpoint")
            if stop:
                log.info(f"stop requested: saved step {step}; continue with --resume latest")
                break
    if step == total and rank == 0:
        log.info(f"done: LoRA in {export_lora(m.denoiser, args.output_dir)}")
    barrier()
    if world_size > 1:
        dist.destroy_process_group()
    return m, step


if __name__ == "__main__":
    try:
        main()
    except (common.UsageError, common.RunError) as e:
        logging.getLogger(NAME).debug("stopped by:", exc_info=True)  # the traceback: log.txt only
        raise SystemExit(f"{NAME}.py: error: {e}")
