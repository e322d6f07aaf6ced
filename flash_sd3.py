"""Flash Diffusion for Stable Diffusion 3 and 3.5: distil the MMDiT into a 1-4 step LoRA student.

Chadebec et al., "Flash Diffusion: Accelerating Any Conditional Diffusion Model for Few Steps Image
Generation", arXiv 2406.02347. The student (transformer + LoRA) learns to reach in one step what the
teacher (the same transformer, LoRA disabled) reaches in K Euler steps of the flow ODE with
classifier-free guidance, from start steps drawn from a Gaussian mixture that moves toward pure
noise over 4 phases; a distribution-matching (DMD) loss and an adversarial loss join after a warm-up
phase.

SD3 specifics: flow matching (x_t = sigma eps + (1 - sigma) z0; the network predicts the velocity
v = eps - z0 at t = 1000 sigma, so x0 = x_t - sigma v); two CLIP encoders (penultimate states padded
to the joint width, pooled projections concatenated) and T5 (without it, its 256 tokens are zeros,
as in the stock pipeline without T5); a fixed negative prompt as the unconditional input; the VAE's
shift_factor applied on encode and decode; a discriminator on the frozen teacher's velocity
prediction of the re-noised sample. SD3.5 Medium and Large train with the same recipe; the teacher's
CFG range, the validation teacher and T5 follow the model (PER_MODEL, read from --model).

Launch (defaults are the paper's SD3 settings; phase lengths count generator updates):
    # one GPU
    python flash_sd3.py --shards "data/{00000..00999}.tar" --output_dir runs/flash_sd3
    # SD3.5 Large (its CFG range and T5 come with it), checkpointing to fit 80 GB
    python flash_sd3.py --model stabilityai/stable-diffusion-3.5-large --gradient_checkpointing \
        --shards "data/{00000..00999}.tar" --output_dir runs/flash_sd35_large
    # one node, 8 GPUs
    torchrun --standalone --nproc_per_node=8 flash_sd3.py --shards "data/{00000..00999}.tar"
    # two nodes (the same command on each; $MASTER is the first node's address)
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_id=flash --rdzv_backend=c10d \
        --rdzv_endpoint=$MASTER:29500 flash_sd3.py --shards "data/{00000..00999}.tar"
Use the result with a stock StableDiffusion3Pipeline: pipe.load_lora_weights(output_dir),
FlowMatchLCMScheduler.from_config(pipe.scheduler.config, shift=1.0),
sigmas=[1.0, 0.8965, 0.7389, 0.4700] (4 steps), guidance_scale=0. See README.md.
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

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FlowMatchLCMScheduler,
                       SD3Transformer2DModel, StableDiffusion3Pipeline)
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from PIL import Image, ImageDraw
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel as DDP
from torchvision.transforms.functional import to_pil_image
from torchvision.utils import make_grid
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm
from transformers import AutoTokenizer, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel
from transformers.utils import cached_file

import common

# ----------------------------------------------------------------------------------------------
# the paper's SD3 settings (its released config); the flags take their defaults from here
# ----------------------------------------------------------------------------------------------
MODEL = "stabilityai/stable-diffusion-3-medium-diffusers"  # SD3-medium
RESOLUTION = 1024  # training resolution (square)
BATCH_SIZE = 2  # images per GPU per generator update
NUM_TEACHER_STEPS = 32  # K: flow-matching Euler steps of the teacher's full solve
PHASE_STEPS = [2500] * 4  # generator updates per phase
# per model (model_family reads --model's transformer config; a flag that is given wins): the
# teacher's CFG range w ~ U[min, max] (one w per batch), the validation grid's teacher (Euler steps
# and CFG) and T5. SD3 Medium: the paper's range; the stock pipeline's 28 steps at CFG 7; T5 off,
# as released. SD3.5 (no Flash release; this project's choice): each model card's sampler (Medium
# 40 steps at CFG 4.5, Large 28 at 3.5) for the validation teacher, and w within 1 of the card's
# CFG: training centred on it, covering the 3.5-4.5 Stability recommends for both (SD3's U[7, 13]
# is twice that). T5 on: the cards sample with it, and their prompt following and lettering rely
# on it (4.7B frozen parameters, 9.5 GB in bf16, on each GPU)
PER_MODEL = {
    "SD3 Medium": dict(guidance_min=7.0, guidance_max=13.0, validation_teacher_steps=28,
                       validation_teacher_guidance=7.0, use_t5=False),
    "SD3.5 Medium": dict(guidance_min=3.5, guidance_max=5.5, validation_teacher_steps=40,
                         validation_teacher_guidance=4.5, use_t5=True),
    "SD3.5 Large": dict(guidance_min=2.5, guidance_max=4.5, validation_teacher_steps=28,
                        validation_teacher_guidance=3.5, use_t5=True),
}
DISTILL_WEIGHTS = [1.0, 1.0, 1.0, 1.0]  # lambda_dist per phase
DMD_WEIGHTS = [0.0, 0.3, 0.5, 0.7]  # lambda_dmd per phase
ADV_WEIGHTS = [0.0, 0.1, 0.3, 0.5]  # lambda_adv per phase
LR = 1e-5  # AdamW, constant, for the LoRA and for the discriminator head
# PEFT's default init (True): B = 0, the student starts as the teacher
LORA_RANK, LORA_ALPHA, LORA_INIT = 64, 8, True
# PixArt's list. On SD3-medium: in each block attn.to_q/k/v/out.0, ff.net.0.proj, ff.net.2,
# ff_context.net.0.proj and the adaLN norm1(_context).linear; the patch conv, the timestep and
# pooled-text embedders, norm_out.linear and proj_out (with the head: the paper's published 90.4M
# trainable parameters at rank 64). SD3.5 Medium's dual-attention blocks add attn2.to_q/k/v/out.0
# (their norm1.linear is hit as before): LoRA 101.7M; SD3.5 Large (38 blocks): 219.3M
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj",
                "ff.net.2", "proj", "linear", "linear_1", "linear_2"]
# training-grid sigmas the discriminator sees: 0.029, 0.5, 0.75, 0.9 (shift 3)
GAN_INDICES = [-10, -250, -500, -750]
MIN_AESTHETIC = 6.0  # keep samples with json aesthetic_score >= this
# the unconditional input of the released Flash SD3 (gojasper/flash-diffusion, flash_sd3 model code)
NEGATIVE_PROMPT = ("deformed, distorted, disfigured, poorly drawn, bad anatomy, wrong anatomy, "
                   "extra limb, missing limb, floating limbs, mutated hands and fingers, "
                   "disconnected limbs, mutation, mutated, ugly, disgusting, blurry, amputation, "
                   "NSFW")
T5_TOKENS = 256  # the stock pipeline's max_sequence_length; also the zero tokens without T5

DEFAULT_PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "a red fox in a snowy forest, golden hour",
    "a bowl of ramen on a wooden table, studio lighting",
    "a watercolor painting of a lighthouse on a cliff",
]
# the repeated blocks --compile compiles in place (one graph per class and shape, seconds each)
COMPILE_BLOCKS = ("JointTransformerBlock",)
MAX_NONFINITE = 5  # non-finite losses in a row before training stops
NAME = "flash_sd3"  # the default output folder, the log, the progress bar, the ComfyUI file


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                formatter_class=HelpFormatter)
    a = p.add_argument
    # data and model
    a("--model", default=MODEL,
      help="hub id or local diffusers folder of SD3 Medium, SD3.5 Medium or SD3.5 Large (or a "
      "fine-tune of one)")
    a("--shards", nargs="+", required=True, help="webdataset shards: braces, globs, pipe: URLs")
    a("--output_dir", default=f"runs/{NAME}", help="metrics, samples, checkpoints, the LoRA")
    a("--resolution", type=positive_int, default=RESOLUTION, help="training size (square crop)")
    a("--batch_size", type=positive_int, default=BATCH_SIZE, help="images per GPU per update")
    a("--min_aesthetic", type=float, default=MIN_AESTHETIC, help="keep scores >= this; <0: off")
    a("--aesthetic_key", default="aesthetic_score", help="json key that --min_aesthetic reads")
    a("--num_workers", type=non_negative_int, default=4, help="data loading processes per GPU")
    a("--use_t5", action=argparse.BooleanOptionalAction, default=None,
      help=f"encode prompts with T5 too (off: zero T5 tokens); {per_model('use_t5')}")
    a("--negative_prompt", default=NEGATIVE_PROMPT,
      help="the unconditional input of CFG ('' allowed)")
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
    a("--guidance_min", type=float, default=None,
      help=f"CFG w ~ U[min, max], one per batch; {per_model('guidance_min')}")
    a("--guidance_max", type=float, default=None,
      help=f"see --guidance_min; {per_model('guidance_max')}")
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
    a("--validation_teacher_steps", type=positive_int, default=None,
      help=f"Euler steps of the grids' teacher column; {per_model('validation_teacher_steps')}")
    a("--validation_teacher_guidance", type=float, default=None,
      help=f"its CFG scale; {per_model('validation_teacher_guidance')}")
    args = p.parse_args(argv)
    for flag, value in PER_MODEL[model_family(args.model)].items():
        if getattr(args, flag) is None:  # not given: this model's value
            setattr(args, flag, value)
    return args


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """-h with each default; the flags that default per model (None) list their values instead."""

    def _get_help_string(self, action):
        per = action.dest in PER_MODEL["SD3 Medium"]
        return action.help if per else super()._get_help_string(action)


def per_model(flag):
    """-h's text for a flag whose default is per model."""
    return "default: per model: " + ", ".join(f"{k} {v[flag]}" for k, v in PER_MODEL.items())


def model_family(model):
    """The PER_MODEL entry of --model, from its transformer config: SD3.5 Medium has dual-attention
    blocks (dual_attention_layers), SD3.5 Large (38 blocks) RMS qk-norm without them, SD3 Medium
    neither. A config that does not load reads as SD3 Medium (the default model); check_args then
    names the problem."""
    try:
        cfg = SD3Transformer2DModel.load_config(model, subfolder="transformer")
    except Exception:
        return "SD3 Medium"
    if cfg.get("dual_attention_layers"):
        return "SD3.5 Medium"
    return "SD3.5 Large" if cfg.get("qk_norm") == "rms_norm" else "SD3 Medium"


def check_args(args):
    """This backbone's start-up checks of --model and --resolution, before any model loads; a
    UsageError names the flag and the fix (check_flags checks what every script checks)."""
    try:
        vae_cfg = AutoencoderKL.load_config(args.model, subfolder="vae")
        net_cfg = SD3Transformer2DModel.load_config(args.model, subfolder="transformer")
        sched_cfg = FlowMatchEulerDiscreteScheduler.load_config(args.model, subfolder="scheduler")
    except Exception as e:
        raise model_error(args.model, "a diffusers SD3 layout (vae/, transformer/ and scheduler/ "
                          "configs)", e) from e
    if net_cfg.get("_class_name") == "FluxTransformer2DModel":
        raise common.UsageError(f"--model {args.model}: a FLUX transformer; use flash_flux.py")
    euler = sched_cfg.get("_class_name") == "FlowMatchEulerDiscreteScheduler"
    if not euler or sched_cfg.get("use_dynamic_shifting"):
        raise common.UsageError(f"--model {args.model}: not a fixed-shift FlowMatchEulerDiscrete"
                                "Scheduler; this script distils SD3-style flow matching only")
    if args.use_t5:  # transformers' configs fall back to defaults silently: look for the file
        try:
            t5_config = cached_file(args.model, "config.json", subfolder="text_encoder_3")
        except OSError:
            t5_config = None
        if t5_config is None:
            raise common.UsageError(f"--use_t5 (SD3.5's default): --model {args.model} has no T5 "
                                    "encoder (text_encoder_3/); pass --no-use_t5")
    # the latent must split into patches (as the stock pipeline checks), and fit the position
    # embedding
    down = 2 ** (len(vae_cfg["block_out_channels"]) - 1) * net_cfg["patch_size"]
    if args.resolution % down:
        hint = max(down, args.resolution // down * down)
        raise common.UsageError(f"--resolution {args.resolution}: must be a multiple of {down} "
                                f"for this model (VAE downsampling x patch size), e.g. {hint}")
    most = net_cfg.get("pos_embed_max_size")
    if most and args.resolution // down > most:
        raise common.UsageError(f"--resolution {args.resolution}: at most {most * down} for this "
                                "model (its position embedding's size)")


# ----------------------------------------------------------------------------------------------
# the backbone: loading, latents, text encoding, denoiser calls
# ----------------------------------------------------------------------------------------------

def build(args, device):
    """Everything a training step reads, loaded once. The student is the transformer with its
    LoRA; the teacher is the same transformer with the LoRA disabled (`teacher_mode`): one copy of
    the weights."""
    bf16 = args.mixed_precision == "bf16" and device.type == "cuda"
    dtype = torch.bfloat16 if bf16 else torch.float32
    tokenizers = [CLIPTokenizer.from_pretrained(args.model, subfolder=s)
                  for s in ("tokenizer", "tokenizer_2")]
    encoders = [CLIPTextModelWithProjection.from_pretrained(args.model, subfolder=s, dtype=dtype)
                for s in ("text_encoder", "text_encoder_2")]
    if args.use_t5:  # 4.8B parameters: loaded only when asked for
        tokenizers.append(AutoTokenizer.from_pretrained(args.model, subfolder="tokenizer_3"))
        encoders.append(T5EncoderModel.from_pretrained(args.model, subfolder="text_encoder_3",
                                                       dtype=dtype))
    vae = AutoencoderKL.from_pretrained(args.model, subfolder="vae", dtype=dtype)
    net = SD3Transformer2DModel.from_pretrained(args.model, subfolder="transformer", dtype=dtype)
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
    sched = FlowMatchEulerDiscreteScheduler.from_config(sched_config)
    # noise levels: the 1000-step training grid (DMD, GAN) and the teacher's K-step solver grid
    # (and its final 0)
    train_sigmas = sched.sigmas.to(device, torch.float32)
    sched.set_timesteps(args.num_teacher_steps, device=device)
    joint_dim = net.config.joint_attention_dim
    uncond = encode_text(tokenizers, encoders, [args.negative_prompt], joint_dim, device)
    # the discriminator head, sized from the teacher's velocity prediction at this resolution
    latent = args.resolution // 2 ** (len(vae.config.block_out_channels) - 1)
    with torch.no_grad(), teacher_mode(net):
        z = torch.zeros(1, vae.config.latent_channels, latent, latent, device=device, dtype=dtype)
        f = denoise(net, z, torch.ones(1, device=device), uncond)
    lpips = None
    if args.distill_loss == "lpips":
        lpips = common.make_lpips().to(device).requires_grad_(False).eval()
    return SimpleNamespace(
        device=device, tokenizers=tokenizers, text_encoders=encoders, vae=vae, denoiser=net,
        uncond=uncond, joint_dim=joint_dim, sched_config=sched_config, lpips=lpips,
        train_sigmas=train_sigmas, sigmas=sched.sigmas.to(device, torch.float32),
        disc=make_discriminator(f.shape[1], f.shape[-1]).to(device),
        decode=partial(from_latent, vae),
        start_probs=[common.start_index_probs(args.num_teacher_steps, p, args.timestep_distribution)
                     for p in common.MODE_PROBS],
        extra=None)  # per-sample inputs the data loader adds beside image and caption: none here


def to_latent(vae, pixels):
    """z0 = (E(x) - shift_factor) * scaling_factor (the official Flash SD3 code left the shift
    out)."""
    z = vae.encode(pixels).latent_dist.sample().float()
    return (z - vae.config.shift_factor) * vae.config.scaling_factor


def from_latent(vae, z):
    return vae.decode(z / vae.config.scaling_factor + vae.config.shift_factor).sample


@torch.no_grad()
def encode_text(tokenizers, encoders, prompts, joint_dim, device):
    """SD3 conditioning as the stock pipeline builds it: both CLIPs' penultimate states side by
    side, zero-padded to the joint width, followed by T5's 256 states (zeros when T5 is off);
    pooled = both CLIP projections."""
    states, pooled = [], []
    for tokenizer, encoder in zip(tokenizers[:2], encoders[:2]):
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids.to(device)
        out = encoder(input_ids=ids, output_hidden_states=True)
        states.append(out.hidden_states[-2])
        pooled.append(out.text_embeds)
    clip = torch.cat(states, dim=-1)
    if len(encoders) > 2:
        ids = tokenizers[2](prompts, padding="max_length", max_length=T5_TOKENS, truncation=True,
                            add_special_tokens=True, return_tensors="pt").input_ids.to(device)
        t5 = encoders[2](input_ids=ids)[0].to(clip.dtype)
    else:
        t5 = clip.new_zeros(len(prompts), T5_TOKENS, joint_dim)
    text = torch.cat([F.pad(clip, (0, t5.shape[-1] - clip.shape[-1])), t5], dim=1)
    return dict(text=text, pooled=torch.cat(pooled, dim=-1))


def cat_cond(*conds):
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}


def expand_cond(c, B):
    return {k: v.expand(B, *v.shape[1:]) for k, v in c.items()}


def denoise(net, x, sigma, c):
    """Velocity prediction v (= eps - z0) in fp32; sigma: (B,) noise levels, given to the network
    as 1000 sigma."""
    return net(hidden_states=x, timestep=1000 * sigma, encoder_hidden_states=c["text"],
               pooled_projections=c["pooled"]).sample.float()


def x0_from_v(x, v, sigma):
    """The flow's clean estimate x0 = x - sigma v: the student's one-step output and the sampler's
    step."""
    return x - common.bcast(sigma, x) * v


def cfg_v(net, x, sigma, cond, uncond, w):
    """Classifier-free guidance in one batched forward: cat[uncond, cond], then chunk(2)."""
    v = denoise(net, torch.cat([x, x]), torch.cat([sigma, sigma]), cat_cond(uncond, cond))
    v_u, v_c = v.chunk(2)
    return v_u + w * (v_c - v_u)


@contextlib.contextmanager
def teacher_mode(net):
    """LoRA off: the transformer is the frozen teacher."""
    net.disable_adapters()
    try:
        yield
    finally:
        net.enable_adapters()


@torch.no_grad()
def teacher_solve(m, x_t, k, cond, uncond, w):
    """Euler steps of the flow ODE with CFG, x <- x + (sigma_next - sigma) v, from the grid's
    sigma_k to 0 (m.sigmas: the teacher's K-step grid, K + 1 values ending at 0)."""
    with teacher_mode(m.denoiser):
        x = x_t
        for i in range(k, len(m.sigmas) - 1):
            v = cfg_v(m.denoiser, x, m.sigmas[i].expand(len(x)), cond, uncond, w)
            x = x + (m.sigmas[i + 1] - m.sigmas[i]) * v
    return x.float()


@torch.no_grad()
def student_sample(m, z0, k, cond, K):
    """--backward_sim (DMD2's backward simulation): the student's own 4-step flow sampler from
    pure noise (sigma_0 = 1) down to the last 4-step grid level above sigma_k, x0 re-noised with
    fresh noise between steps. Returns x0."""
    B = len(z0)
    x = torch.randn_like(z0)
    for j in range(0, k, K // 4):
        sj = m.sigmas[j].expand(B)
        x0 = x0_from_v(x, denoise(m.denoiser, x, sj, cond), sj)
        if j + K // 4 < k:
            x = common.renoise_flow(x0, torch.randn_like(z0), m.sigmas[j + K // 4].expand(B))
    return x0


def student_sigmas(sigmas, n):
    """The sigmas of the student's n-step sampler (n in 1, 2, 4), for a FlowMatchLCMScheduler with
    shift=1.0: every (4 // n)-th of the mixture's modes, teacher-grid indices j * (K // 4) (sigmas
    1.0, 0.8965, 0.7389, 0.4700 at K = 32, shift 3), so where the student trains most; the flow
    analogue of the trailing LCM grid. The stock FlowMatchLCM 4-step sigmas fall between the
    modes, where the mixture has almost no mass."""
    step = (len(sigmas) - 1) // 4 * (4 // n)
    return [float(sigmas[j * step]) for j in range(n)]


def make_discriminator(ch, size):
    """SD3 head (the released config) on the teacher's velocity prediction (16 x 128 x 128 at
    1024 px): four k4 s2 convs (64 ... 512 channels, GroupNorm and SiLU) to 8x8, then a k4 conv to
    a 5x5 logit map. Smaller maps skip the strided convs that would shrink them below 4x4 (k3 s1
    instead)."""
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
        cond = encode_text(m.tokenizers, m.text_encoders, batch["text"], m.joint_dim, dev)
    uncond = expand_cond(m.uncond, B)

    # 2. start index k from the phase's mixture; x_t at the grid's sigma_k (sigma_0 = 1: noise)
    K = args.num_teacher_steps
    k = common.sample_start_index(m.start_probs[phase])
    sigma = m.sigmas[k].expand(B)
    eps = torch.randn_like(z0)
    x_t = common.renoise_flow(z0, eps, sigma)
    if k > 0 and args.backward_sim > 0 and torch.rand(()) < args.backward_sim:
        with autocast:  # from the student's own outputs, not data
            x_t = common.renoise_flow(student_sample(m, z0, k, cond, K), eps, sigma)

    # 3. student: one step, x_hat = x_t - sigma v (the flow's x0 prediction, no boundary scalings)
    with autocast:
        v_s = denoise(student, x_t, sigma, cond)
    x_hat = x0_from_v(x_t, v_s, sigma)

    # 4. teacher: Euler solve from sigma_k to 0 with CFG, w ~ U[g_min, g_max] once per batch
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
        if l_dmd > 0:  # 5b. DMD at a 1000-step training-grid level: teacher+CFG real, student fake
            s2 = m.train_sigmas[torch.randint(0, len(m.train_sigmas), (B,), device=dev)]
            y = common.renoise_flow(x_hat.detach(), torch.randn_like(x_hat), s2)
            w2 = float(torch.empty(()).uniform_(args.guidance_min, args.guidance_max))
            with torch.no_grad():
                with teacher_mode(m.denoiser):
                    v_real = cfg_v(m.denoiser, y, s2, cond, uncond, w2)
                v_fake = denoise(m.denoiser, y, s2, cond)
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
            f_real = denoise(m.denoiser, common.renoise_flow(real, n, s), s, cond).float()
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
    losses.update(loss_g=loss_g, t=1000 * sigma[0].float(), w=torch.tensor(w, device=dev))
    return {name: v.detach() for name, v in losses.items()}


# ----------------------------------------------------------------------------------------------
# validation and export
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def sample_grid(m, args, step):
    """Teacher (flow-matching Euler at --validation_teacher_steps and _guidance, the model card's
    sampler, with the negative prompt) beside the student (FlowMatchLCMScheduler at student_sigmas,
    1/2/4 steps, no CFG), on the validation prompts with a fixed generator; rows are prompts.
    Returns the PNG's path."""
    t5 = len(m.text_encoders) > 2
    pipe = StableDiffusion3Pipeline(
        transformer=m.denoiser, vae=m.vae,
        scheduler=FlowMatchLCMScheduler.from_config(m.sched_config, shift=1.0),
        text_encoder=m.text_encoders[0], tokenizer=m.tokenizers[0],
        text_encoder_2=m.text_encoders[1], tokenizer_2=m.tokenizers[1],
        text_encoder_3=m.text_encoders[2] if t5 else None,
        tokenizer_3=m.tokenizers[2] if t5 else None)
    pipe.set_progress_bar_config(disable=True)
    bf16 = args.mixed_precision == "bf16"
    autocast = torch.autocast(m.device.type, dtype=torch.bfloat16, enabled=bf16)

    cuda = [torch.cuda.current_device()] if m.device.type == "cuda" else []

    def run(**kw):
        g = torch.Generator(m.device).manual_seed(args.seed)
        # the sampler's re-noising draws from the global RNG: fix it too, and leave training's RNG
        # as it was
        with autocast, torch.random.fork_rng(devices=cuda):
            torch.manual_seed(args.seed)
            return pipe(args.validation_prompts, generator=g, height=args.resolution,
                        width=args.resolution, max_sequence_length=T5_TOKENS, output_type="pt",
                        **kw).images.float().cpu()

    columns = {f"student {n} step{'s' * (n > 1)}":
               run(sigmas=student_sigmas(m.sigmas, n), guidance_scale=0.0) for n in (1, 2, 4)}
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(m.sched_config)
    negative = [args.negative_prompt] * len(args.validation_prompts)
    with teacher_mode(m.denoiser):
        teacher = run(num_inference_steps=args.validation_teacher_steps,
                      guidance_scale=args.validation_teacher_guidance, negative_prompt=negative)
    columns = {f"teacher {args.validation_teacher_steps} steps": teacher, **columns}
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
    """pytorch_lora_weights.safetensors that StableDiffusion3Pipeline.load_lora_weights(out_dir)
    loads, with the LoRA config (rank, alpha) in its metadata so the scale alpha / r is right; and
    flash_sd3_comfyui.safetensors for ComfyUI (comfyui_state_dict). Returns the first's path."""
    StableDiffusion3Pipeline.save_lora_weights(
        out_dir, transformer_lora_layers=get_peft_model_state_dict(net),
        transformer_lora_adapter_metadata=net.peft_config["default"].to_dict())
    save_file(comfyui_state_dict(net), os.path.join(out_dir, f"{NAME}_comfyui.safetensors"))
    return os.path.join(out_dir, "pytorch_lora_weights.safetensors")


def comfyui_state_dict(net):
    """The LoRA in the form ComfyUI maps onto its SD3 model: transformer.<diffusers module
    path>.lora_down.weight (PEFT's lora_A), .lora_up.weight (lora_B) and .alpha, the trained alpha
    (ComfyUI takes alpha = r where a module has no .alpha, 8x too strong at the default rank 64,
    alpha 8). Conv LoRA keeps its 4-D shapes."""
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
