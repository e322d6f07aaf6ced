"""Flash Diffusion for SDXL driven by a frozen T2I-Adapter (canny edges): a 1-4 step LoRA student.

Chadebec et al., "Flash Diffusion: Accelerating Any Conditional Diffusion Model for Few Steps Image
Generation", arXiv 2406.02347. The student (UNet + LoRA) learns to reach in one step what the
teacher (the same UNet, LoRA disabled) reaches in K DPM-Solver++ steps with classifier-free
guidance, from start steps drawn from a Gaussian mixture that moves toward pure noise over 4 phases;
a distribution-matching (DMD) loss and an adversarial loss on frozen UNet features join after a
warm-up phase.

SDXL conditioning as in flash_sdxl.py (two CLIP encoders, pooled embedding, fixed time ids, zeroed
unconditional embeddings), plus a frozen T2I-Adapter: its residuals, from the canny edge map of the
training image (computed in the data pipeline, or read from the shard with --edge_key) and scaled
by --adapter_conditioning_scale, go to every denoiser call: the student, both halves of the
teacher's CFG, the DMD passes and the feature pass that feeds the discriminator (whose input
includes the mid residual).

Launch (defaults are the paper's adapter settings; phase lengths count generator updates; more
nodes: README.md):
    # one GPU
    python flash_adapter.py --shards "data/{00000..00999}.tar"
    # one node, 8 GPUs
    torchrun --standalone --nproc_per_node=8 flash_adapter.py --shards "data/{00000..00999}.tar"
Use the result with a stock StableDiffusionXLAdapterPipeline and the same adapter:
pipe.load_lora_weights(output_dir), LCMScheduler (timestep_spacing="trailing"), 4 steps,
guidance_scale=0.
"""
import argparse
import contextlib
import errno
import io
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
from functools import partial
from types import SimpleNamespace

import cv2
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from diffusers import (AutoencoderKL, DPMSolverMultistepScheduler, LCMScheduler,
                       StableDiffusionXLAdapterPipeline, StableDiffusionXLPipeline, T2IAdapter,
                       UNet2DConditionModel)
from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from PIL import Image, ImageDraw
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel as DDP
from torchvision.transforms.functional import to_pil_image
from torchvision.utils import make_grid
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

import common

# ----------------------------------------------------------------------------------------------
# the paper's SDXL + T2I-Adapter settings (its released config); the flags default to these
# ----------------------------------------------------------------------------------------------
MODEL = "stabilityai/stable-diffusion-xl-base-1.0"
ADAPTER = "TencentARC/t2i-adapter-canny-sdxl-1.0"  # the frozen T2I-Adapter (canny edges)
ADAPTER_SCALE = 0.8  # adapter_conditioning_scale: the weight of its residuals
RESOLUTION = 1024  # training resolution (square)
BATCH_SIZE = 2  # images per GPU per generator update
NUM_TEACHER_STEPS = 16  # K: DPM-Solver++ steps of the teacher's full solve
PHASE_STEPS = [2500] * 4  # generator updates per phase
GUIDANCE = (3.0, 13.0)  # teacher CFG scale w ~ U[min, max], one per batch
DISTILL_WEIGHTS = [1.0, 1.0, 1.0, 1.0]  # lambda_dist per phase
DMD_WEIGHTS = [0.0, 0.3, 0.5, 0.7]  # lambda_dmd per phase
ADV_WEIGHTS = [0.0, 0.1, 0.2, 0.3]  # lambda_adv per phase
LR = 1e-5  # AdamW, constant, for the LoRA and for the discriminator head
LORA_RANK, LORA_ALPHA, LORA_INIT = 64, 64, "gaussian"  # scale alpha / r = 1
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # every transformer block's attention
GAN_TIMESTEPS = [10, 250, 500, 750]  # noise levels the discriminator sees, one drawn per sample
MIN_AESTHETIC = -1.0  # no aesthetic filter (negative: off)

DEFAULT_PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "a red fox in a snowy forest, golden hour",
    "a bowl of ramen on a wooden table, studio lighting",
    "a watercolor painting of a lighthouse on a cliff",
]
SINGLE_FILE = (".safetensors", ".ckpt")  # --model as one checkpoint file (most fine-tunes)
# the repeated blocks --compile compiles in place (one graph per class and shape, seconds each)
COMPILE_BLOCKS = ("BasicTransformerBlock", "ResnetBlock2D")
MAX_NONFINITE = 5  # non-finite losses in a row before training stops
NAME = "flash_adapter"  # the default output folder, the log, the progress bar, the ComfyUI file


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    # data and model
    a("--model", default=MODEL,
      help="hub id, local diffusers folder, or one .safetensors/.ckpt file (with --base_model)")
    a("--base_model", default=None,
      help="with a single-file --model: its base model's diffusers folder or hub id (configs "
      "and tokenizers); the file is converted once into OUTPUT_DIR/model")
    a("--adapter", default=ADAPTER, help="T2I-Adapter: hub id or local folder")
    a("--adapter_conditioning_scale", type=float, default=ADAPTER_SCALE,
      help="scale of the adapter's residuals")
    a("--edge_key", default=None,
      help="shard key of a ready edge map (e.g. canny.png); default: canny of the image")
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
      help="compile the transformer and ResNet blocks in place (the first steps compile)")
    a("--gradient_checkpointing", action="store_true",
      help="trade compute for memory (advised under 40 GB)")
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
    layout = "an SDXL layout (vae/, unet/, scheduler/) and a T2I-Adapter config"
    source = config_source(args)
    try:
        vae_cfg = AutoencoderKL.load_config(source, subfolder="vae")
        sched_cfg = DPMSolverMultistepScheduler.load_config(source, subfolder="scheduler")
        T2IAdapter.load_config(args.adapter)
        unet_cfg = UNet2DConditionModel.load_config(source, subfolder="unet")
    except Exception as e:
        if source != args.model:
            raise common.UsageError(f"--base_model {source}: cannot read {layout} there: "
                                    f"{one_line(e)}") from e
        if not os.path.isdir(args.model) and os.path.isdir(args.adapter):  # a failed download
            raise model_error(args.model, layout, e) from e
        raise common.UsageError(f"--model {args.model} / --adapter {args.adapter}: cannot read "
                                f"{layout} there: {one_line(e)}") from e
    predicts = sched_cfg.get("prediction_type", "epsilon")  # read, never assumed
    if predicts not in common.PREDICTION_TYPES:
        raise common.UsageError(f"--model {args.model}: its scheduler's prediction_type is "
                                f"{predicts}; this script distils epsilon and v_prediction models")
    if sched_cfg.get("rescale_betas_zero_snr") and predicts == "epsilon":  # abar[999] = 0
        raise common.UsageError(f"--model {args.model}: zero terminal SNR with epsilon prediction "
                                "has no x0 at t = 999; its scheduler needs v_prediction")
    if unet_cfg.get("addition_embed_type") != "text_time":
        raise common.UsageError(f"--model {args.model}: not an SDXL UNet (addition_embed_type "
                                f"{unet_cfg.get('addition_embed_type')}); use flash_sd.py for it")
    # the latent must survive every UNet downsampling; the stock pipeline wants multiples of 8
    vae_down = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    factor = math.lcm(8, vae_down * 2 ** (len(unet_cfg["block_out_channels"]) - 1))
    if args.resolution % factor:
        hint = max(factor, args.resolution // factor * factor)
        raise common.UsageError(f"--resolution {args.resolution}: must be a multiple of {factor} "
                                f"for this model (VAE and UNet downsampling), e.g. {hint}")


# ----------------------------------------------------------------------------------------------
# the conditioning image: canny edges of the training image, or an edge map from the shard
# ----------------------------------------------------------------------------------------------

def canny_edges(img, resolution, detect_resolution=384, low=100, high=200):
    """OpenCV's Canny on the image resized to 384 px (as the released setup did), back at the
    training resolution; uint8 (H, W) with edges at 255."""
    size = (detect_resolution, detect_resolution)
    small = cv2.resize(np.asarray(img), size, interpolation=cv2.INTER_AREA)
    edges = cv2.Canny(small, low, high)
    # up (the real case, 384 -> 1024) bilinear; down (small test sizes) by area: thin edges survive
    up = resolution >= detect_resolution
    interpolation = cv2.INTER_LINEAR if up else cv2.INTER_AREA
    return cv2.resize(edges, (resolution, resolution), interpolation=interpolation)


def edge_input(sample, img, resolution, edge_key, channels):
    """common.make_loader's `extra` hook: {"edges": (channels, H, W) in [0, 1]}. A missing or
    unreadable edge map raises ValueError, so the sample is skipped and counted (data.bad_extra)."""
    if edge_key is None:
        edges = canny_edges(img, resolution)
    else:
        if edge_key not in sample:
            raise ValueError(f"no {edge_key!r} in the sample")
        try:
            with Image.open(io.BytesIO(sample[edge_key])) as e:
                edges = np.asarray(common.resize_center_crop(e.convert("L"), resolution))
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise ValueError(f"unreadable {edge_key!r}") from err
    edges = torch.from_numpy(edges.astype(np.float32) / 255.0)
    return dict(edges=edges[None].expand(channels, -1, -1).contiguous())


def config_source(args):
    """Where --model's configs are read: --model itself, or for a single-file checkpoint the
    base model --base_model names (one is required with the other)."""
    single = args.model.endswith(SINGLE_FILE) or os.path.isfile(args.model)
    if single and not (args.model.endswith(SINGLE_FILE) and os.path.isfile(args.model)):
        raise common.UsageError(f"--model {args.model}: no such .safetensors or .ckpt file; give a "
                                "single-file checkpoint, a diffusers folder or a hub id")
    if single and args.base_model is None:
        raise common.UsageError(f"--model {args.model}: a single file; name its base model's "
                                "diffusers folder or hub id with --base_model")
    if args.base_model is not None and not single:
        raise common.UsageError(f"--base_model: only with a single-file --model; {args.model} is "
                                "a folder or hub id, whose own configs are read: drop it")
    return args.base_model if single else args.model


# ----------------------------------------------------------------------------------------------
# the backbone: loading, text encoding, denoiser calls, features for the discriminator
# ----------------------------------------------------------------------------------------------

def diffusers_folder(args, device):
    """--model as a diffusers folder: itself, or for a single file OUTPUT_DIR/model, converted
    by rank 0 with from_single_file (configs and tokenizers from --base_model) while the other
    ranks wait. converted_from.json names the file: a resumed run loads the folder as it is."""
    if args.base_model is None:
        return args.model
    folder = os.path.join(args.output_dir, "model")
    origin = json.dumps(dict(model=os.path.abspath(args.model), base_model=args.base_model,
                             bytes=os.path.getsize(args.model),
                             mtime=os.path.getmtime(args.model)))
    marker, failed = os.path.join(folder, "converted_from.json"), None
    with contextlib.suppress(OSError), open(marker) as f:
        origin = None if f.read() == origin else origin  # None: converted already
    if origin and (not dist.is_initialized() or dist.get_rank() == 0):
        try:
            pipe = StableDiffusionXLPipeline.from_single_file(args.model, config=args.base_model)
            shutil.rmtree(folder + ".tmp", ignore_errors=True)
            pipe.save_pretrained(folder + ".tmp")
            with open(os.path.join(folder + ".tmp", "converted_from.json"), "w") as f:
                f.write(origin)
            shutil.rmtree(folder, ignore_errors=True)
            os.rename(folder + ".tmp", folder)
        except Exception as e:
            failed = (f"--model {args.model}: from_single_file with --base_model "
                      f"{args.base_model} failed ({one_line(e)}); check that both are one family")
    if any_rank(device, failed is not None)[0]:  # also the other ranks' wait
        raise common.UsageError(failed or f"--model {args.model}: rank 0 could not convert it")
    return folder


def build(args, device):
    """Everything a training step reads, loaded once. The student is the UNet with its LoRA; the
    teacher is the same UNet with the LoRA disabled (`teacher_mode`): one copy of the weights."""
    bf16 = args.mixed_precision == "bf16" and device.type == "cuda"
    dtype = torch.bfloat16 if bf16 else torch.float32
    model = diffusers_folder(args, device)  # a single file: converted once
    tokenizers = [CLIPTokenizer.from_pretrained(model, subfolder=f)
                  for f in ("tokenizer", "tokenizer_2")]
    text_encoders = [
        CLIPTextModel.from_pretrained(model, subfolder="text_encoder", dtype=dtype),
        CLIPTextModelWithProjection.from_pretrained(model, subfolder="text_encoder_2",
                                                    dtype=dtype)]
    # bf16 on GPU: SDXL's VAE overflows in fp16 (hence stock pipelines' fp32 upcast), not in bf16
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae", dtype=dtype)
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", dtype=dtype)
    for module in (*text_encoders, vae, unet):
        module.requires_grad_(False).eval().to(device)
    unet.add_adapter(LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha,
                                init_lora_weights=LORA_INIT, target_modules=LORA_TARGETS))
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # trainable LoRA weights stay fp32 under bf16 autocast
    if args.gradient_checkpointing:  # the UNet, and the VAE decoder LPIPS backpropagates through
        unet.enable_gradient_checkpointing()
        vae.enable_gradient_checkpointing()
    sched_config = DPMSolverMultistepScheduler.load_config(model, subfolder="scheduler")
    teacher_sched = DPMSolverMultistepScheduler.from_config(
        sched_config, algorithm_type="dpmsolver++", solver_order=2, timestep_spacing="trailing",
        final_sigmas_type="zero")
    adapter = T2IAdapter.from_pretrained(args.adapter, dtype=dtype)
    adapter.requires_grad_(False).eval().to(device)
    # the discriminator head, sized from the mid-block feature shape at this resolution
    latent = args.resolution // 2 ** (len(vae.config.block_out_channels) - 1)
    with torch.no_grad(), teacher_mode(unet):
        z = torch.zeros(1, vae.config.latent_channels, latent, latent, device=device, dtype=dtype)
        probe = zero_uncond(encode_text(tokenizers, text_encoders, [""], args.resolution, device))
        edges = torch.zeros(1, adapter.config.in_channels, args.resolution, args.resolution,
                            device=device, dtype=dtype)
        probe["adapter"] = adapter_residuals(adapter, edges, args.adapter_conditioning_scale)
        t0 = torch.zeros(1, device=device, dtype=torch.long)
        f = mid_features(unet, z, t0, probe)
    lpips = None
    if args.distill_loss == "lpips":
        lpips = common.make_lpips().to(device).requires_grad_(False).eval()
    return SimpleNamespace(
        device=device, tokenizers=tokenizers, text_encoders=text_encoders, vae=vae, denoiser=unet,
        adapter=adapter, teacher_sched=teacher_sched, sched_config=sched_config, lpips=lpips,
        # abar as LCMScheduler (the student's sampler) has it: DPM-Solver moves a zero-SNR
        # abar[999] = 0 to 2**-24; the x0 formulas take v straight, finite at 0
        alphas_cumprod=LCMScheduler.from_config(sched_config).alphas_cumprod.to(device),
        prediction_type=teacher_sched.config.prediction_type,  # epsilon or v_prediction
        disc=make_discriminator(f.shape[1], f.shape[-1]).to(device),
        decode=lambda z: vae.decode(z / vae.config.scaling_factor).sample,
        start_probs=[common.start_index_probs(args.num_teacher_steps, p, args.timestep_distribution)
                     for p in common.MODE_PROBS],
        # per-sample inputs the data loader adds beside image and caption: the edge map
        extra=partial(edge_input, resolution=args.resolution, edge_key=args.edge_key,
                      channels=adapter.config.in_channels),
        val_edges=None)  # the validation grids' edge maps: the first batch's (train_step sets it)


@torch.no_grad()
def encode_text(tokenizers, text_encoders, prompts, resolution, device):
    """SDXL conditioning, batch-first: text (B, 77, 768 + 1280) from both encoders' penultimate
    layers, pooled (B, 1280) from CLIP-G's projection, time ids (B, 6) = original size, crop (0, 0),
    target size."""
    hidden = []
    for tokenizer, encoder in zip(tokenizers, text_encoders):
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids.to(device)
        out = encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
    time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], device=device)
    return dict(text=torch.cat(hidden, dim=-1), pooled=out.text_embeds,
                time_ids=time_ids.expand(len(prompts), -1).to(out.text_embeds.dtype))


def cat_cond(*conds):
    """Concatenate conditionings along the batch; the adapter's residuals are a list of tensors."""
    return {k: [torch.cat(r) for r in zip(*(c[k] for c in conds))] if k == "adapter"
            else torch.cat([c[k] for c in conds]) for k in conds[0]}


def zero_uncond(cond):
    """The unconditional input: zeroed text and pooled embeddings; size ids and adapter residuals
    kept (the adapter drives both halves of CFG)."""
    return dict(cond, text=torch.zeros_like(cond["text"]), pooled=torch.zeros_like(cond["pooled"]))


@torch.no_grad()
def adapter_residuals(adapter, edges, scale):
    return [r * scale for r in adapter(edges)]


def denoise(unet, x, t, c):
    """epsilon prediction in fp32; t: (B,) timesteps."""
    added = dict(text_embeds=c["pooled"], time_ids=c["time_ids"])
    # the UNet pops the residuals from the list it gets: every call needs its own list
    return unet(x, t, encoder_hidden_states=c["text"], added_cond_kwargs=added,
                down_intrablock_additional_residuals=list(c["adapter"])).sample.float()


def cfg_eps(unet, x, t, cond, uncond, w):
    """Classifier-free guidance in one batched forward: cat[uncond, cond], then chunk(2)."""
    e = denoise(unet, torch.cat([x, x]), torch.cat([t, t]), cat_cond(uncond, cond))
    e_u, e_c = e.chunk(2)
    return e_u + w * (e_c - e_u)


def mid_features(unet, x, t, cond):
    """The UNet's forward (diffusers' UNet2DConditionModel.forward for SDXL with T2I-Adapter
    residuals) stopped after the mid block: the discriminator's input, without paying for the up
    blocks."""
    emb = unet.time_embedding(unet.get_time_embed(sample=x, timestep=t))
    added = dict(text_embeds=cond["pooled"], time_ids=cond["time_ids"])
    emb = emb + unet.get_aug_embed(emb=emb, encoder_hidden_states=cond["text"],
                                   added_cond_kwargs=added)
    c, res = cond["text"], list(cond["adapter"])
    h = unet.conv_in(x)
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            extra = dict(additional_residuals=res.pop(0)) if res else {}
            h, _ = block(hidden_states=h, temb=emb, encoder_hidden_states=c, **extra)
        else:
            h, _ = block(hidden_states=h, temb=emb)
            h = h + res.pop(0) if res else h
    h = unet.mid_block(h, emb, encoder_hidden_states=c)
    return h + res.pop(0) if res and res[0].shape == h.shape else h  # the adapter's mid residual


@contextlib.contextmanager
def teacher_mode(unet):
    """LoRA off: the UNet is the frozen teacher."""
    unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()


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
        x0 = common.lcm_x0(x, denoise(m.denoiser, x, tj, cond), tj, abar, m.prediction_type)
        if j + K // 4 < k:
            x = common.renoise(x0, torch.randn_like(z0), ts[j + K // 4].expand(B), abar)
    return x0


def make_discriminator(ch, size):
    """Adapter head (the released config) for (ch, size, size) mid-block features: 32x32 at 1024 px
    goes through three k4 s2 convs to 4x4, then one logit. Smaller maps (lower resolutions, tiny
    test models) skip the strided convs that would shrink them below 4x4 (k3 s1 instead) and end in
    a logit map."""
    layers, c_in = [], ch
    for c_out in (64, 128, 256):
        strided = size >= 8
        down = (4, 2, 1) if strided else (3, 1, 1)  # kernel, stride, padding
        layers += [nn.Conv2d(c_in, c_out, *down, bias=False), nn.GroupNorm(4, c_out), nn.SiLU()]
        size, c_in = size // 2 if strided else size, c_out
    return nn.Sequential(*layers, nn.Conv2d(c_in, 1, min(4, size), 1, 0, bias=False), nn.Flatten())


# ----------------------------------------------------------------------------------------------
# one training step (paper section 3, Algorithm 1)
# ----------------------------------------------------------------------------------------------

def train_step(m, student, disc, batch, step, args):
    """One batch: one forward, then the generator's and the discriminator's backward; the loop steps
    the optimizers. `student` and `disc` are the DDP-wrapped UNet and head (the plain ones in one
    process). Returns {loss name: detached tensor}."""
    dev, abar = m.device, m.alphas_cumprod
    bf16 = args.mixed_precision == "bf16"
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16)
    phase = common.phase_of(step, args.phase_steps)
    B = batch["pixel_values"].shape[0]
    if m.val_edges is None:  # the validation grids' edge maps: the first batch's
        m.val_edges = batch["edges"][: len(args.validation_prompts)]

    # 1. data: latents, text conditioning and the adapter's residuals
    with torch.no_grad(), autocast:
        pixels = batch["pixel_values"].to(dev, non_blocking=True)
        z0 = m.vae.encode(pixels).latent_dist.sample().float() * m.vae.config.scaling_factor
        cond = encode_text(m.tokenizers, m.text_encoders, batch["text"], args.resolution, dev)
        edges = batch["edges"].to(dev, non_blocking=True)
        cond["adapter"] = adapter_residuals(m.adapter, edges, args.adapter_conditioning_scale)
    uncond = zero_uncond(cond)

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

    # 3. student: one step, x0 from its epsilon or v with the LCM boundary scalings
    with autocast:
        eps_s = denoise(student, x_t, t, cond)
    x_hat = common.lcm_x0(x_t, eps_s, t, abar, m.prediction_type)

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
            losses["dmd"] = common.dmd_loss(x_hat, y, e_real, e_fake, abar[t2],
                                            m.prediction_type)
        # 5c. GAN: frozen-teacher mid-block features of re-noised fake and real latents, same noise
        levels = torch.tensor(GAN_TIMESTEPS, device=dev)
        s = levels[torch.randint(0, len(GAN_TIMESTEPS), (B,), device=dev)]
        s_noise = common.renoise_level(s, m.teacher_sched.timesteps, args.renoise)
        n = torch.randn_like(x_hat)
        real = x_T if args.teacher_as_real else z0
        fake_in = common.renoise(x_hat if l_adv > 0 else x_hat.detach(), n, s_noise, abar)
        # the real half needs no gradient: run apart, it saves no activations for the backward
        with torch.no_grad(), teacher_mode(m.denoiser):
            real_in = common.renoise(real, n, s_noise, abar)
            f_real = mid_features(m.denoiser, real_in, s, cond).float()
        # checkpointing would recompute the fake half in the generator's backward, LoRA back on:
        # then the gradient w.r.t. its input is taken here, LoRA off, and carried into that one
        ckpt, carried = l_adv > 0 and m.denoiser.is_gradient_checkpointing, zero
        fake = fake_in.detach().requires_grad_() if ckpt else fake_in
        with torch.set_grad_enabled(l_adv > 0), teacher_mode(m.denoiser):
            f_fake = mid_features(m.denoiser, fake, s, cond).float()
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
    """The edge map, the teacher with the adapter (DPM-Solver++, 25 steps, CFG 7.5) and the student
    (LCM, 1/2/4 steps, no CFG), on the validation prompts paired with the first training batch's
    edge maps, with a fixed generator; rows are prompts. Returns the PNG's path."""
    pipe = StableDiffusionXLAdapterPipeline(
        vae=m.vae, text_encoder=m.text_encoders[0], text_encoder_2=m.text_encoders[1],
        tokenizer=m.tokenizers[0], tokenizer_2=m.tokenizers[1], unet=m.denoiser,
        adapter=m.adapter, force_zeros_for_empty_prompt=True,
        scheduler=LCMScheduler.from_config(m.sched_config, timestep_spacing="trailing"))
    n = len(args.validation_prompts)
    edges = m.val_edges[torch.arange(n) % len(m.val_edges)].to(m.device)
    pipe.set_progress_bar_config(disable=True)
    bf16 = args.mixed_precision == "bf16"
    autocast = torch.autocast(m.device.type, dtype=torch.bfloat16, enabled=bf16)

    def run(steps, guidance):
        g = torch.Generator(m.device).manual_seed(args.seed)
        with autocast:
            return pipe(args.validation_prompts, image=edges, num_inference_steps=steps,
                        guidance_scale=guidance,
                        adapter_conditioning_scale=args.adapter_conditioning_scale, generator=g,
                        height=args.resolution, width=args.resolution,
                        output_type="pt").images.float().cpu()

    columns = {f"student {n} step{'s' * (n > 1)}": run(n, 0.0) for n in (1, 2, 4)}
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(m.sched_config,
                                                             algorithm_type="dpmsolver++")
    with teacher_mode(m.denoiser):
        columns = {"teacher 25 steps": run(25, 7.5), **columns}
    columns = {"edges": edges[:, :1].float().cpu().expand(-1, 3, -1, -1), **columns}
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


def export_lora(unet, out_dir):
    """pytorch_lora_weights.safetensors, which StableDiffusionXLAdapterPipeline.load_lora_weights
    (out_dir) loads, with the LoRA config (rank, alpha) in its metadata so the scale is right; and
    flash_adapter_comfyui.safetensors for ComfyUI, AUTOMATIC1111 and Forge. Returns the first's
    path."""
    StableDiffusionXLAdapterPipeline.save_lora_weights(
        out_dir, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())
    save_file(comfyui_state_dict(unet), os.path.join(out_dir, f"{NAME}_comfyui.safetensors"))
    return os.path.join(out_dir, "pytorch_lora_weights.safetensors")


def comfyui_state_dict(unet):
    """The LoRA in kohya's form on the diffusers module path (lora_unet_<path with . as _> with
    .lora_down.weight, .lora_up.weight and .alpha), which ComfyUI, AUTOMATIC1111 and Forge map onto
    their SDXL UNet. .alpha is the trained alpha (diffusers' convert_state_dict_to_kohya writes
    alpha = r, right only when alpha = rank)."""
    lora = {f"unet.{k}": v for k, v in get_peft_model_state_dict(unet).items()}
    alpha = float(unet.peft_config["default"].lora_alpha)
    kohya = convert_state_dict_to_kohya(lora)
    return {k: torch.tensor(alpha) if k.endswith(".alpha") else v.contiguous()
            for k, v in kohya.items()}


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
