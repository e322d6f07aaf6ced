"""Flash Diffusion for FLUX.1-dev: distil the guidance-distilled MMDiT into a 1-4 step LoRA student.

Chadebec et al., "Flash Diffusion: Accelerating Any Conditional Diffusion Model for Few Steps Image
Generation", arXiv 2406.02347. The student (transformer + LoRA) learns to reach in one step what the
teacher (the same transformer, LoRA disabled) reaches in K Euler steps of the flow ODE, from start
steps drawn from a Gaussian mixture that moves toward pure noise over 4 phases; a
distribution-matching (DMD) loss and an adversarial loss join after a warm-up phase.

The paper has no FLUX section: this script is its SD3 recipe (flash_sd3.py) adapted where FLUX.1-dev
differs, and those adaptations are this repository's choices.
- Latents: z0 = (E(x) - shift_factor) * scaling_factor, 16 channels, packed 2x2 into (B, L, 64)
  tokens for the transformer, with the image ids FluxPipeline builds; x_t = sigma eps + (1 - sigma)
  z0; the network predicts v = eps - z0 at sigma, so the student's one step is x_t - sigma v.
- Text: CLIP-L's pooled output and T5-XXL's 512 token states; text ids are zeros.
- The grid: FluxPipeline's sigmas linspace(1, 1/K, K), shifted by its resolution-dependent
  mu = calculate_shift(L) (1.15 at 1024 px). At K = 32 the mixture's modes (indices 0, 8, 16, 24)
  are then exactly the stock 4-step FLUX grid (1.0, 0.9045, 0.7595, 0.5128 at 1024 px), so the
  student samples with a stock FluxPipeline and FlowMatchLCMScheduler.
- Guidance: FLUX.1-dev takes a guidance embedding g, not two CFG branches. The teacher solves at
  g ~ U[g_min, g_max] (one forward per Euler step) and the student is given the same g, so that
  guidance_scale stays a knob at inference.
- DMD: real score the teacher at g, fake score the student at g, at a sigma of the shifted
  1000-step training grid. The discriminator reads the frozen teacher's velocity, as in SD3.

Launch (phase lengths count generator updates; see README.md for the memory this needs):
    # one node, 8 GPUs
    torchrun --standalone --nproc_per_node=8 flash_flux.py --shards "data/{00000..00999}.tar"
FLUX.1-dev's licence is non-commercial, and a LoRA trained from it is a derivative of it.
Use the result with a stock FluxPipeline: pipe.load_lora_weights(output_dir),
pipe.scheduler = FlowMatchLCMScheduler.from_config(pipe.scheduler.config),
pipe(prompt, num_inference_steps=4, guidance_scale=3.5). See README.md.
"""
import argparse
import contextlib
import errno
import json
import logging
import os
import resource
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
from functools import partial
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FlowMatchLCMScheduler,
                       FluxPipeline, FluxTransformer2DModel)
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from PIL import Image, ImageDraw
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel as DDP
from torchvision.transforms.functional import to_pil_image
from torchvision.utils import make_grid
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm
from transformers import AutoConfig, AutoTokenizer, CLIPTextModel, CLIPTokenizer, T5EncoderModel

import common

# ----------------------------------------------------------------------------------------------
# FLUX.1-dev settings: the paper's SD3 recipe where it carries over, else this repository's choice
# ----------------------------------------------------------------------------------------------
MODEL = "black-forest-labs/FLUX.1-dev"  # gated on the Hub: accept its licence, then `hf login`
RESOLUTION = 1024  # training resolution (square)
BATCH_SIZE = 2  # images per GPU per generator update (SD3's), with gradient checkpointing
NUM_TEACHER_STEPS = 32  # K: Euler steps of the teacher's full solve (K = 32 puts the modes on the
# stock 4-step grid)
PHASE_STEPS = [2500] * 4  # generator updates per phase (SD3's)
# g ~ U[min, max] per batch: 3.5 (the model card's and FluxPipeline's default) +- 1.5, so that the
# student learns the guidance users turn down or up from the default, not one value
GUIDANCE = (2.0, 5.0)
DISTILL_WEIGHTS = [1.0, 1.0, 1.0, 1.0]  # lambda_dist per phase (SD3's)
DMD_WEIGHTS = [0.0, 0.3, 0.5, 0.7]  # lambda_dmd per phase (SD3's)
ADV_WEIGHTS = [0.0, 0.1, 0.3, 0.5]  # lambda_adv per phase (SD3's)
LR = 1e-5  # AdamW, constant, for the LoRA and for the discriminator head
# rank 64 as SD3's; alpha = rank (scale 1). PEFT's default init: B = 0, the student starts as the
# teacher
LORA_RANK, LORA_ALPHA, LORA_INIT = 64, 64, True
# the attention projections of both streams in the 19 double-stream blocks, and the 38
# single-stream blocks' q, k, v, MLP-in and output projections (not the final proj_out): 3.1M
# per double block and 3.3M per single block, 186.8M in all at rank 64
LORA_TARGETS = (r".*transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj"
                r"|add_v_proj|to_add_out)|proj_mlp|proj_out)")
# training-grid indices the discriminator sees: sigmas 0.032, 0.52, 0.76, 0.91 at 1024 px
GAN_INDICES = [-10, -250, -500, -750]
MIN_AESTHETIC = 6.0  # keep samples with json aesthetic_score >= this
T5_TOKENS = 512  # FluxPipeline's max_sequence_length for FLUX.1-dev
SAMPLE_GUIDANCE = 3.5  # the grids' guidance scale, teacher and student (the model card's)

DEFAULT_PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "a red fox in a snowy forest, golden hour",
    "a bowl of ramen on a wooden table, studio lighting",
    "a watercolor painting of a lighthouse on a cliff",
]
# the repeated blocks --compile compiles in place (one graph per class and shape, seconds each)
COMPILE_BLOCKS = ("FluxTransformerBlock", "FluxSingleTransformerBlock")
MAX_NONFINITE = 5  # non-finite losses in a row before training stops
NAME = "flash_flux"  # the default output folder, the log, the progress bar, the ComfyUI file


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    # data and model
    a("--model", default=MODEL,
      help="hub id or local diffusers folder of FLUX.1-dev or a fine-tune of its architecture")
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
      help="K: flow-matching Euler steps of the teacher's full solve (4 to 1000)")
    a("--timestep_distribution", default="mixture", choices=["mixture", "uniform", "gaussian"],
      help="start index over the K solver steps (uniform, gaussian: the paper's ablations)")
    a("--backward_sim", type=probability, default=0.0,
      help="probability that x_t for k > 0 comes from the student's own 4-step sampler (detached), "
      "not from data (DMD2's backward simulation; 0: the paper's recipe)")
    a("--guidance_min", type=float, default=GUIDANCE[0],
      help="guidance embedding g ~ U[min, max], one per batch, for teacher and student alike")
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
    a("--gradient_checkpointing", action=argparse.BooleanOptionalAction, default=True,
      help="trade compute for memory (on by default: the 12B transformer needs it at 1024 px)")
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
        net_cfg = FluxTransformer2DModel.load_config(args.model, subfolder="transformer")
        sched_cfg = FlowMatchEulerDiscreteScheduler.load_config(args.model, subfolder="scheduler")
        t5_type = AutoConfig.from_pretrained(args.model, subfolder="text_encoder_2").model_type
    except Exception as e:
        raise model_error(args.model, "a diffusers FLUX layout (vae/, transformer/, scheduler/ and "
                          "text_encoder_2/ configs)", e) from e
    if net_cfg.get("_class_name") != "FluxTransformer2DModel":
        raise common.UsageError(f"--model {args.model}: its transformer is a "
                                f"{net_cfg.get('_class_name')}; use flash_sd3.py for SD3 models")
    if t5_type != "t5":
        raise common.UsageError(f"--model {args.model}: its text_encoder_2 is {t5_type}, not T5; "
                                "not a FLUX.1 folder")
    if not net_cfg.get("guidance_embeds"):  # FLUX.1-schnell: timestep-distilled already
        raise common.UsageError(f"--model {args.model}: no guidance embedding (FLUX.1-schnell?); "
                                "this script distils guidance-distilled FLUX.1-dev models")
    if not sched_cfg.get("use_dynamic_shifting"):
        raise common.UsageError(f"--model {args.model}: its scheduler has no resolution-dependent "
                                "shift (use_dynamic_shifting); not a FLUX scheduler")
    # the latent must split into 2x2 patches, as the stock pipeline packs it
    down = 2 ** (len(vae_cfg["block_out_channels"]) - 1) * 2
    if args.resolution % down:
        hint = max(down, args.resolution // down * down)
        raise common.UsageError(f"--resolution {args.resolution}: must be a multiple of {down} "
                                f"for this model (VAE downsampling x 2x2 packing), e.g. {hint}")


# ----------------------------------------------------------------------------------------------
# the backbone: loading, latents, text encoding, denoiser calls
# ----------------------------------------------------------------------------------------------

def build(args, device):
    """Everything a training step reads, loaded once. The student is the transformer with its
    LoRA; the teacher is the same transformer with the LoRA disabled (`teacher_mode`): one copy of
    the weights."""
    bf16 = args.mixed_precision == "bf16" and device.type == "cuda"
    dtype = torch.bfloat16 if bf16 else torch.float32
    tokenizers = [CLIPTokenizer.from_pretrained(args.model, subfolder="tokenizer"),
                  AutoTokenizer.from_pretrained(args.model, subfolder="tokenizer_2")]
    encoders = [CLIPTextModel.from_pretrained(args.model, subfolder="text_encoder", dtype=dtype),
                T5EncoderModel.from_pretrained(args.model, subfolder="text_encoder_2", dtype=dtype)]
    vae = AutoencoderKL.from_pretrained(args.model, subfolder="vae", dtype=dtype)
    net = FluxTransformer2DModel.from_pretrained(args.model, subfolder="transformer", dtype=dtype)
    for module in (*encoders, vae, net):
        module.requires_grad_(False).eval().to(device)
    net.add_adapter(LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha,
                               init_lora_weights=LORA_INIT, target_modules=LORA_TARGETS))
    for p in net.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # trainable LoRA weights stay fp32 under bf16 autocast
    if args.gradient_checkpointing:  # the denoiser, and the VAE decoder LPIPS backpropagates
        net.enable_gradient_checkpointing()
        vae.enable_gradient_checkpointing()
    sched_config = FlowMatchEulerDiscreteScheduler.load_config(args.model, subfolder="scheduler")
    latent = args.resolution // 2 ** (len(vae.config.block_out_channels) - 1)
    train_sigmas, sigmas = flux_grids(sched_config, args.num_teacher_steps, latent)
    # the discriminator head, sized from the teacher's velocity prediction at this resolution
    with torch.no_grad(), teacher_mode(net):
        z = torch.zeros(1, vae.config.latent_channels, latent, latent, device=device, dtype=dtype)
        c = encode_text(tokenizers, encoders, [""], device)
        f = denoise(net, z, torch.ones(1, device=device), c, torch.ones(1, device=device))
    lpips = None
    if args.distill_loss == "lpips":
        lpips = common.make_lpips().to(device).requires_grad_(False).eval()
    return SimpleNamespace(
        device=device, tokenizers=tokenizers, text_encoders=encoders, vae=vae, denoiser=net,
        sched_config=sched_config, lpips=lpips, train_sigmas=train_sigmas.to(device),
        sigmas=sigmas.to(device), disc=make_discriminator(f.shape[1], f.shape[-1]).to(device),
        decode=partial(from_latent, vae),
        start_probs=[common.start_index_probs(args.num_teacher_steps, p, args.timestep_distribution)
                     for p in common.MODE_PROBS],
        extra=None)  # per-sample inputs the data loader adds beside image and caption: none here


def flux_grids(sched_config, K, latent):
    """The noise levels at this resolution (latent: the VAE latent's side): the shifted 1000-step
    training grid (DMD, GAN) and the teacher's K-step grid with its final 0 (K + 1 values), both
    with the mu FluxPipeline computes for (latent / 2)^2 packed tokens."""
    cfg = sched_config
    mu = calculate_shift((latent // 2) ** 2, cfg.get("base_image_seq_len", 256),
                         cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5),
                         cfg.get("max_shift", 1.15))
    sched = FlowMatchEulerDiscreteScheduler.from_config(cfg)
    sched.set_timesteps(1000, mu=mu)
    train = sched.sigmas[:-1].clone()
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / K, K), mu=mu)  # FluxPipeline's K-step sigmas
    return train.float(), sched.sigmas.float()


def to_latent(vae, pixels):
    """z0 = (E(x) - shift_factor) * scaling_factor, as FluxPipeline decodes it back."""
    z = vae.encode(pixels).latent_dist.sample().float()
    return (z - vae.config.shift_factor) * vae.config.scaling_factor


def from_latent(vae, z):
    return vae.decode(z / vae.config.scaling_factor + vae.config.shift_factor).sample


def pack(z):
    """(B, C, H, W) latents -> (B, H/2 * W/2, 4C) tokens, as FluxPipeline packs them."""
    B, C, H, W = z.shape
    return z.view(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, -1, C * 4)


def unpack(x, H, W):
    """The inverse of pack, for an (H, W) latent."""
    B, _, D = x.shape
    return x.view(B, H // 2, W // 2, D // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, -1, H, W)


def image_ids(H, W, device):
    """(row, column) position of each packed token (first coordinate 0), as FluxPipeline's."""
    ids = torch.zeros(H // 2, W // 2, 3, device=device)
    ids[..., 1] += torch.arange(H // 2, device=device)[:, None]
    ids[..., 2] += torch.arange(W // 2, device=device)[None, :]
    return ids.view(-1, 3)


@torch.no_grad()
def encode_text(tokenizers, encoders, prompts, device):
    """FLUX conditioning as the stock pipeline builds it: CLIP-L's pooled output and T5's 512
    token states."""
    ids = tokenizers[0](prompts, padding="max_length", max_length=tokenizers[0].model_max_length,
                        truncation=True, return_tensors="pt").input_ids.to(device)
    pooled = encoders[0](ids, output_hidden_states=False).pooler_output
    ids = tokenizers[1](prompts, padding="max_length", max_length=T5_TOKENS, truncation=True,
                        return_tensors="pt").input_ids.to(device)
    return dict(text=encoders[1](ids, output_hidden_states=False)[0], pooled=pooled)


def expand_cond(c, B):
    return {k: v.expand(B, *v.shape[1:]) for k, v in c.items()}


def denoise(net, x, sigma, c, g):
    """Velocity prediction v (= eps - z0) in fp32 for (B, C, H, W) latents x, packed for the call
    and unpacked after; sigma: (B,) noise levels, g: (B,) guidance (the network embeds both x1000
    itself)."""
    H, W = x.shape[-2:]
    v = net(hidden_states=pack(x), timestep=sigma, guidance=g, pooled_projections=c["pooled"],
            encoder_hidden_states=c["text"], img_ids=image_ids(H, W, x.device),
            txt_ids=x.new_zeros(c["text"].shape[1], 3)).sample
    return unpack(v.float(), H, W)


def x0_from_v(x, v, sigma):
    """The flow's clean estimate x0 = x - sigma v: the student's one-step output and the sampler's
    step."""
    return x - common.bcast(sigma, x) * v


@contextlib.contextmanager
def teacher_mode(net):
    """LoRA off: the transformer is the frozen teacher."""
    net.disable_adapters()
    try:
        yield
    finally:
        net.enable_adapters()


@torch.no_grad()
def teacher_solve(m, x_t, k, cond, g):
    """Euler steps of the flow ODE at guidance g, x <- x + (sigma_next - sigma) v, from the grid's
    sigma_k to 0 (m.sigmas: the teacher's K-step grid, K + 1 values ending at 0)."""
    with teacher_mode(m.denoiser):
        x = x_t
        for i in range(k, len(m.sigmas) - 1):
            v = denoise(m.denoiser, x, m.sigmas[i].expand(len(x)), cond, g)
            x = x + (m.sigmas[i + 1] - m.sigmas[i]) * v
    return x.float()


@torch.no_grad()
def student_sample(m, z0, k, cond, g, K):
    """--backward_sim (DMD2's backward simulation): the student's own 4-step flow sampler at
    guidance g from pure noise (sigma_0 = 1) down to the last 4-step grid level above sigma_k, x0
    re-noised with fresh noise between steps. Returns x0."""
    B = len(z0)
    x = torch.randn_like(z0)
    for j in range(0, k, K // 4):
        sj = m.sigmas[j].expand(B)
        x0 = x0_from_v(x, denoise(m.denoiser, x, sj, cond, g), sj)
        if j + K // 4 < k:
            x = common.renoise_flow(x0, torch.randn_like(z0), m.sigmas[j + K // 4].expand(B))
    return x0


def make_discriminator(ch, size):
    """SD3's head on the teacher's velocity prediction (16 x 128 x 128 at 1024 px): four k4 s2
    convs (64 ... 512 channels, GroupNorm and SiLU) to 8x8, then a k4 conv to a 5x5 logit map.
    Smaller maps skip the strided convs that would shrink them below 4x4 (k3 s1 instead)."""
    layers, c_in = [], ch
    for i, c_out in enumerate((64, 128, 256, 512)):
        strided = size >= 8
        conv = (4, 2, 1) if strided else (3, 1, 1)  # kernel, stride, padding
        layers.append(nn.Conv2d(c_in, c_out, *conv, bias=False))
        layers += [nn.SiLU()] if i == 0 else [nn.GroupNorm(4, c_out), nn.SiLU()]
        size, c_in = size // 2 if strided else size, c_out
    return nn.Sequential(*layers, nn.Conv2d(c_in, 1, min(4, size), 1, 0, bias=False),
                         nn.Flatten())


# ----------------------------------------------------------------------------------------------
# one training step (paper section 3, Algorithm 1, in flow-matching form)
# ----------------------------------------------------------------------------------------------

def train_step(m, student, disc, batch, step, args):
    """One batch: one forward, then the generator's and the discriminator's backward; the loop steps
    the optimizers. `student` and `disc` are the DDP-wrapped transformer and head (the plain ones in
    one process). Returns {loss name: detached tensor}."""
    dev = m.device
    bf16 = args.mixed_precision == "bf16"
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16)
    phase = common.phase_of(step, args.phase_steps)
    B = batch["pixel_values"].shape[0]

    # 1. data: latents (VAE shift and scale) and text conditioning
    with torch.no_grad(), autocast:
        z0 = to_latent(m.vae, batch["pixel_values"].to(dev, non_blocking=True))
        cond = encode_text(m.tokenizers, m.text_encoders, batch["text"], dev)

    # 2. start index k from the phase's mixture; x_t at the grid's sigma_k (sigma_0 = 1: noise);
    # the guidance g ~ U[g_min, g_max] once per batch, for teacher and student alike
    K = args.num_teacher_steps
    k = common.sample_start_index(m.start_probs[phase])
    sigma = m.sigmas[k].expand(B)
    w = float(torch.empty(()).uniform_(args.guidance_min, args.guidance_max))
    g = torch.full((B,), w, device=dev)
    eps = torch.randn_like(z0)
    x_t = common.renoise_flow(z0, eps, sigma)
    if k > 0 and args.backward_sim > 0 and torch.rand(()) < args.backward_sim:
        with autocast:  # from the student's own outputs, not data
            x_t = common.renoise_flow(student_sample(m, z0, k, cond, g, K), eps, sigma)

    # 3. student: one step at g, x_hat = x_t - sigma v (the flow's x0 prediction)
    with autocast:
        v_s = denoise(student, x_t, sigma, cond, g)
    x_hat = x0_from_v(x_t, v_s, sigma)

    # 4. teacher: Euler solve from sigma_k to 0 at the same g
    with autocast:
        x_T = teacher_solve(m, x_t, k, cond, g)

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
        if l_dmd > 0:  # 5b. DMD at a 1000-step training-grid level: teacher real, student fake
            s2 = m.train_sigmas[torch.randint(0, len(m.train_sigmas), (B,), device=dev)]
            y = common.renoise_flow(x_hat.detach(), torch.randn_like(x_hat), s2)
            with torch.no_grad():
                with teacher_mode(m.denoiser):
                    v_real = denoise(m.denoiser, y, s2, cond, g)
                v_fake = denoise(m.denoiser, y, s2, cond, g)
            losses["dmd"] = common.dmd_loss_flow(x_hat, y, v_real, v_fake, s2)
        # 5c. GAN: the frozen teacher's velocity prediction of re-noised fake and real latents
        # (the same noise)
        levels = torch.tensor(GAN_INDICES, device=dev)
        s = m.train_sigmas[levels[torch.randint(0, len(GAN_INDICES), (B,), device=dev)]]
        n = torch.randn_like(x_hat)
        real = x_T if args.teacher_as_real else z0
        fake_in = common.renoise_flow(x_hat if l_adv > 0 else x_hat.detach(), n, s)
        # the real half needs no gradient: run apart, it saves no activations for the backward
        with torch.no_grad(), teacher_mode(m.denoiser):
            f_real = denoise(m.denoiser, common.renoise_flow(real, n, s), s, cond, g).float()
        # checkpointing would recompute the fake half in the generator's backward, LoRA back on:
        # then the gradient w.r.t. its input is taken here, LoRA off, and carried into that one
        ckpt, carried = l_adv > 0 and m.denoiser.is_gradient_checkpointing, zero
        fake = fake_in.detach().requires_grad_() if ckpt else fake_in
        with torch.set_grad_enabled(l_adv > 0), teacher_mode(m.denoiser):
            f_fake = denoise(m.denoiser, fake, s, cond, g).float()
            if l_adv > 0:
                m.disc.requires_grad_(False)  # D is not trained by the generator's loss
                losses["adv"] = common.gan_g_loss(m.disc(f_fake).float(), args.gan_loss)
            if ckpt:  # d/d(fake_in) of (fake_in * grad).sum() is grad: the same update
                grad = torch.autograd.grad(l_adv * losses["adv"], fake)[0]
                carried, losses["adv"] = (fake_in * grad).sum(), losses["adv"].detach()
    loss_g = l_dist * losses["distill"] + l_dmd * losses["dmd"] + l_adv * losses["adv"]
    (loss_g + carried).backward()
    m.disc.requires_grad_(True)

    # 6. discriminator on the detached fake (and real) features, in every phase
    with autocast:
        logits_real, logits_fake = disc(torch.cat([f_real, f_fake]).detach()).float().chunk(2)
        losses["disc"] = common.gan_d_loss(logits_real, logits_fake, args.gan_loss)
    losses["disc"].backward()
    losses.update(loss_g=loss_g, t=1000 * sigma[0].float(), w=torch.tensor(w, device=dev))
    return {name: v.detach() for name, v in losses.items()}


# ----------------------------------------------------------------------------------------------
# validation and export
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def sample_grid(m, args, step):
    """Teacher (flow-matching Euler, 28 steps: the stock pipeline's default) beside the student
    (FlowMatchLCMScheduler, 1/2/4 steps on the stock grid), both at guidance 3.5, on the validation
    prompts with a fixed generator; rows are prompts. Returns the PNG's path."""
    pipe = FluxPipeline(
        transformer=m.denoiser, vae=m.vae,
        scheduler=FlowMatchLCMScheduler.from_config(m.sched_config),
        text_encoder=m.text_encoders[0], tokenizer=m.tokenizers[0],
        text_encoder_2=m.text_encoders[1], tokenizer_2=m.tokenizers[1])
    pipe.set_progress_bar_config(disable=True)
    bf16 = args.mixed_precision == "bf16"
    autocast = torch.autocast(m.device.type, dtype=torch.bfloat16, enabled=bf16)

    cuda = [torch.cuda.current_device()] if m.device.type == "cuda" else []

    def run(steps):
        g = torch.Generator(m.device).manual_seed(args.seed)
        # the sampler's re-noising draws from the global RNG: fix it too, and leave training's RNG
        # as it was
        with autocast, torch.random.fork_rng(devices=cuda):
            torch.manual_seed(args.seed)
            return pipe(args.validation_prompts, generator=g, height=args.resolution,
                        width=args.resolution, num_inference_steps=steps,
                        guidance_scale=SAMPLE_GUIDANCE, max_sequence_length=T5_TOKENS,
                        output_type="pt").images.float().cpu()

    columns = {f"student {n} step{'s' * (n > 1)}": run(n) for n in (1, 2, 4)}
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(m.sched_config)
    with teacher_mode(m.denoiser):
        columns = {"teacher 28 steps": run(28), **columns}
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
    """pytorch_lora_weights.safetensors that FluxPipeline.load_lora_weights(out_dir) loads, with
    the LoRA config (rank, alpha) in its metadata so the scale alpha / r is right; and
    flash_flux_comfyui.safetensors for ComfyUI (comfyui_state_dict). Returns the first's path."""
    FluxPipeline.save_lora_weights(
        out_dir, transformer_lora_layers=get_peft_model_state_dict(net),
        transformer_lora_adapter_metadata=net.peft_config["default"].to_dict())
    save_file(comfyui_state_dict(net), os.path.join(out_dir, f"{NAME}_comfyui.safetensors"))
    return os.path.join(out_dir, "pytorch_lora_weights.safetensors")


def comfyui_state_dict(net):
    """The LoRA in the form ComfyUI maps onto its fused FLUX layers: transformer.<diffusers module
    path>.lora_down.weight (PEFT's lora_A), .lora_up.weight (lora_B) and .alpha, the trained alpha
    on every module (ComfyUI takes alpha = r where a module has none)."""
    alpha = float(net.peft_config["default"].lora_alpha)
    parts = {"A.weight": "lora_down.weight", "B.weight": "lora_up.weight"}
    out = {}
    for k, v in get_peft_model_state_dict(net).items():
        path, part = k.rsplit(".lora_", 1)
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
