"""Flash Diffusion for Stable Diffusion XL: distil the UNet into a 1-4 step LoRA student.

Chadebec et al., "Flash Diffusion: Accelerating Any Conditional Diffusion Model for Few Steps Image
Generation", arXiv 2406.02347. The student (UNet + LoRA) learns to reach in one step what the teacher
(the same UNet, LoRA disabled) reaches in K DPM-Solver++ steps with classifier-free guidance, from start
steps drawn from a Gaussian mixture that moves toward pure noise over 4 phases; a distribution-matching
(DMD) loss and an adversarial loss on frozen UNet features join after a warm-up phase.

SDXL specifics: CLIP-L and CLIP-G penultimate hidden states concatenated, CLIP-G's pooled projection,
size/crop time ids fixed to the training resolution and crop (0, 0), and zeroed text embeddings as the
unconditional input (the stock pipeline's default for an empty negative prompt).

Launch (defaults are the paper's SDXL settings; phase lengths count generator updates):
    # one GPU
    python flash_sdxl.py --shards "data/{00000..00999}.tar" --output_dir runs/flash_sdxl
    # one node, 8 GPUs
    torchrun --standalone --nproc_per_node=8 flash_sdxl.py --shards "data/{00000..00999}.tar"
    # two nodes (the same command on each; $MASTER is the first node's address)
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_id=flash --rdzv_backend=c10d \
        --rdzv_endpoint=$MASTER:29500 flash_sdxl.py --shards "data/{00000..00999}.tar"
Use the result with a stock pipeline: pipe.load_lora_weights(output_dir), LCMScheduler
(timestep_spacing="trailing"), 4 steps, guidance_scale=0. See README.md.
"""
import argparse
import contextlib
import math
import os
import time
from functools import partial

import torch
import torch.nn as nn
from diffusers import (AutoencoderKL, DPMSolverMultistepScheduler, LCMScheduler, StableDiffusionXLPipeline,
                       UNet2DConditionModel)
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from tqdm import tqdm
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

import common

DEFAULT_PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "a red fox in a snowy forest, golden hour",
    "a bowl of ramen on a wooden table, studio lighting",
    "a watercolor painting of a lighthouse on a cliff",
]
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # attention projections of every transformer block
GAN_TIMESTEPS = [10, 250, 500, 750]  # noise levels the discriminator sees, one drawn per sample
# what --compile compiles, each in place. SDXL at 1024 px, batch 2 on an H200: the transformer blocks alone
# (11 graphs, 40 s to compile) run a step in 2.11 s against 2.78 s eager; the ResNet blocks too (52 graphs,
# 112 s) in 2.04 s, which repays their compile time within the first 1,000 steps
COMPILE_BLOCKS = ("BasicTransformerBlock", "ResnetBlock2D")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    # data and model
    a("--model", default="stabilityai/stable-diffusion-xl-base-1.0", help="hub id or local diffusers folder")
    a("--shards", nargs="+", required=True, help="webdataset tar shards: brace patterns, globs or pipe: URLs")
    a("--output_dir", default="runs/flash_sdxl", help="metrics, samples, checkpoints and the final LoRA")
    a("--resolution", type=int, default=1024, help="training resolution (square; short side resized, centre crop)")
    a("--batch_size", type=int, default=2, help="images per GPU per generator update")
    a("--min_aesthetic", type=float, default=6.0, help="keep samples with json aesthetic_score >= this; <0: off")
    a("--num_workers", type=int, default=4, help="data loading processes per GPU")
    # schedule: 4 phases (paper section 3.2)
    a("--phase_steps", type=int, nargs=4, default=[2500] * 4, help="generator updates per phase")
    a("--max_steps", type=int, default=None, help="stop early after this many updates (default: sum of phases)")
    a("--num_teacher_steps", type=int, default=32, help="K: DPM-Solver++ steps of the teacher's full solve")
    a("--timestep_distribution", default="mixture", choices=["mixture", "uniform", "gaussian"],
      help="start-index distribution over the K solver steps (uniform/gaussian: the paper's ablations)")
    a("--guidance_min", type=float, default=3.0, help="teacher CFG scale w ~ U[min, max], one per batch")
    a("--guidance_max", type=float, default=13.0, help="see --guidance_min")
    # losses
    a("--distill_loss", default="lpips", choices=["lpips", "l2", "l1"], help="student vs teacher output")
    a("--distill_weights", type=float, nargs=4, default=[1.0, 1.0, 1.0, 1.0], help="lambda_dist per phase")
    a("--dmd_weights", type=float, nargs=4, default=[0.0, 0.3, 0.5, 0.7], help="lambda_dmd per phase")
    a("--adv_weights", type=float, nargs=4, default=[0.0, 0.1, 0.2, 0.3], help="lambda_adv per phase")
    a("--gan_loss", default="lsgan", choices=["lsgan", "hinge", "non_saturating"], help="adversarial loss")
    a("--teacher_as_real", action="store_true", help="discriminator's real samples: teacher outputs, not data")
    # optimisation
    a("--lr", type=float, default=1e-5, help="AdamW learning rate of the LoRA (constant)")
    a("--lr_disc", type=float, default=1e-5, help="AdamW learning rate of the discriminator head (constant)")
    a("--lora_rank", type=int, default=64, help="LoRA rank r")
    a("--lora_alpha", type=float, default=64, help="LoRA alpha (scale = alpha / r)")
    a("--mixed_precision", default="bf16", choices=["bf16", "no"], help="bf16 autocast (frozen weights in bf16 on GPU)")
    a("--compile", action="store_true", help="compile the transformer and ResNet blocks in place (the first steps compile)")
    a("--gradient_checkpointing", action="store_true", help="trade compute for memory (advised under 40 GB)")
    a("--seed", type=int, default=0, help="global seed; rank r uses seed + r")
    # outputs
    a("--log_every", type=int, default=50, help="updates between metrics lines (losses all-reduced)")
    a("--sample_every", type=int, default=1000, help="updates between validation grids")
    a("--checkpoint_every", type=int, default=1000, help="updates between checkpoints")
    a("--keep_checkpoints", type=int, default=3, help="newest checkpoints kept (0: keep all)")
    a("--resume", default=None, help="'latest' or a checkpoints/step_NNNNNN folder")
    a("--overwrite", action="store_true", help="start a new run in an output_dir that holds one")
    a("--validation_prompts", nargs="+", default=DEFAULT_PROMPTS, help="prompts of the sample grids")
    return p.parse_args(argv)


def check_args(args):
    """Everything that can be checked before a model is loaded; a UsageError names the flag and the fix.
    Returns the checkpoint folder to resume from, or None."""
    common.check_run_args(args)
    try:
        vae_cfg = AutoencoderKL.load_config(args.model, subfolder="vae")
        unet_cfg = UNet2DConditionModel.load_config(args.model, subfolder="unet")
    except Exception as e:
        first_line = str(e).splitlines()[0] if str(e) else ""
        raise common.UsageError(f"--model {args.model}: cannot read a diffusers SDXL layout there (vae/ and "
                                f"unet/ configs): {type(e).__name__}: {first_line}") from e
    if unet_cfg.get("addition_embed_type") != "text_time":
        raise common.UsageError(f"--model {args.model}: not an SDXL UNet (addition_embed_type "
                                f"{unet_cfg.get('addition_embed_type')}); use flash_sd.py for it")
    # the latent must survive every UNet downsampling; the stock pipeline (validation) wants multiples of 8
    down = 2 ** (len(vae_cfg["block_out_channels"]) - 1) * 2 ** (len(unet_cfg["block_out_channels"]) - 1)
    factor = math.lcm(8, down)
    if args.resolution % factor:
        raise common.UsageError(f"--resolution {args.resolution}: must be a multiple of {factor} for this model "
                                f"(VAE and UNet downsampling), e.g. {max(factor, args.resolution // factor * factor)}")
    return common.resolve_resume(args.resume, args.output_dir)


# ------------------------------------------------------------------------------------------------------
# the backbone: loading, text encoding, denoiser calls, features for the discriminator
# ------------------------------------------------------------------------------------------------------

def load_models(args, device, weight_dtype):
    tokenizers = [CLIPTokenizer.from_pretrained(args.model, subfolder=f) for f in ("tokenizer", "tokenizer_2")]
    text_encoders = [CLIPTextModel.from_pretrained(args.model, subfolder="text_encoder", dtype=weight_dtype),
                     CLIPTextModelWithProjection.from_pretrained(args.model, subfolder="text_encoder_2",
                                                                 dtype=weight_dtype)]
    # bf16 on GPU: SDXL's VAE overflows in fp16 (hence the fp32 upcast of stock pipelines), not in bf16
    vae = AutoencoderKL.from_pretrained(args.model, subfolder="vae", dtype=weight_dtype)
    unet = UNet2DConditionModel.from_pretrained(args.model, subfolder="unet", dtype=weight_dtype)
    for m in (*text_encoders, vae, unet):
        m.requires_grad_(False).eval().to(device)
    # student = unet + LoRA; teacher = the same unet with the LoRA disabled (one copy of the weights)
    unet.add_adapter(LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, init_lora_weights="gaussian",
                                target_modules=LORA_TARGETS))
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # trainable LoRA weights stay fp32 under bf16 autocast
    if args.gradient_checkpointing:  # the denoiser, and the VAE decoder that the LPIPS loss backpropagates through
        unet.enable_gradient_checkpointing()
        vae.enable_gradient_checkpointing()
    sched_config = DPMSolverMultistepScheduler.load_config(args.model, subfolder="scheduler")
    teacher_sched = DPMSolverMultistepScheduler.from_config(
        sched_config, algorithm_type="dpmsolver++", solver_order=2, timestep_spacing="trailing",
        final_sigmas_type="zero")
    return tokenizers, text_encoders, vae, unet, teacher_sched, sched_config


@torch.no_grad()
def encode_text(tokenizers, text_encoders, prompts, resolution, device):
    """SDXL conditioning, batch-first: text (B, 77, 768 + 1280) from both encoders' penultimate layers,
    pooled (B, 1280) from CLIP-G's projection, time ids (B, 6) = original size, crop (0, 0), target size."""
    hidden = []
    for tokenizer, encoder in zip(tokenizers, text_encoders):
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(device)
        out = encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
    time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], device=device)
    return dict(text=torch.cat(hidden, dim=-1), pooled=out.text_embeds,
                time_ids=time_ids.expand(len(prompts), -1).to(out.text_embeds.dtype))


def cat_cond(*conds):
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}


def zero_uncond(cond):
    """The unconditional input: zeroed text and pooled embeddings, the size ids kept."""
    return dict(text=torch.zeros_like(cond["text"]), pooled=torch.zeros_like(cond["pooled"]), time_ids=cond["time_ids"])


def denoise(unet, x, t, c):
    """epsilon prediction in fp32; t: (B,) timesteps."""
    return unet(x, t, encoder_hidden_states=c["text"],
                added_cond_kwargs=dict(text_embeds=c["pooled"], time_ids=c["time_ids"])).sample.float()


def cfg_eps(unet, x, t, cond, uncond, w):
    """Classifier-free guidance in one batched forward: cat[uncond, cond], then chunk(2)."""
    e_u, e_c = denoise(unet, torch.cat([x, x]), torch.cat([t, t]), cat_cond(uncond, cond)).chunk(2)
    return e_u + w * (e_c - e_u)


def mid_features(unet, x, t, cond):
    """The UNet's forward (diffusers' UNet2DConditionModel.forward for SDXL) stopped after the mid block:
    the discriminator's input, without paying for the up blocks."""
    emb = unet.time_embedding(unet.get_time_embed(sample=x, timestep=t))
    added = dict(text_embeds=cond["pooled"], time_ids=cond["time_ids"])
    emb = emb + unet.get_aug_embed(emb=emb, encoder_hidden_states=cond["text"], added_cond_kwargs=added)
    c = cond["text"]
    h = unet.conv_in(x)
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            h, _ = block(hidden_states=h, temb=emb, encoder_hidden_states=c)
        else:
            h, _ = block(hidden_states=h, temb=emb)
    return unet.mid_block(h, emb, encoder_hidden_states=c)


@contextlib.contextmanager
def teacher_mode(unet, no_checkpointing=False):
    """LoRA off: the UNet is the frozen teacher. Gradient checkpointing would recompute this pass during
    backward with the LoRA back on, so passes that backpropagate in teacher mode turn it off."""
    ckpt = no_checkpointing and unet.is_gradient_checkpointing
    unet.disable_adapters()
    if ckpt:
        unet.disable_gradient_checkpointing()
    try:
        yield
    finally:
        unet.enable_adapters()
        if ckpt:
            unet.enable_gradient_checkpointing()


@torch.no_grad()
def teacher_solve(m, x_t, k, cond, uncond, w):
    """K-step DPM-Solver++ with CFG from ts[k] down to 0 (m.teacher_sched.set_timesteps(K) done by the
    caller, which also resets the solver's multistep state)."""
    with teacher_mode(m.unet):
        x = x_t
        for tau in m.teacher_sched.timesteps[k:]:
            e = cfg_eps(m.unet, x, tau.expand(len(x)), cond, uncond, w)
            x = m.teacher_sched.step(e, tau, x).prev_sample
    return x.float()


def make_discriminator(ch, size):
    """SDXL head (METHOD.md section 6) for (ch, size, size) mid-block features: 32x32 at 1024 px goes
    through three k4 s2 convs to 4x4, then one logit. Smaller maps (lower resolutions, tiny test models)
    skip the strided convs that would shrink them below 4x4 (k3 s1 instead) and end in a logit map."""
    layers, c_in = [], ch
    for i, c_out in enumerate((256, 512, 1024)):
        strided = size >= 8
        layers.append(nn.Conv2d(c_in, c_out, 4, 2, 1, bias=False) if strided
                      else nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False))
        layers += [nn.SiLU()] if i == 0 else [nn.GroupNorm(4, c_out), nn.SiLU()]
        size, c_in = size // 2 if strided else size, c_out
    return nn.Sequential(*layers, nn.Conv2d(c_in, 1, min(4, size), 1, 0, bias=False), nn.Flatten())


# ------------------------------------------------------------------------------------------------------
# one training step (METHOD.md section 3)
# ------------------------------------------------------------------------------------------------------

def train_step(m, batch, step, args, stop_requested=False):
    """One batch: one forward, a generator (LoRA) update, a discriminator update. `m` holds the models
    (see main). Returns ({loss name: tensor}, updated?, stop?)."""
    dev, abar = m.device, m.alphas_cumprod
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.mixed_precision == "bf16")
    phase = common.phase_of(step, args.phase_steps)
    B = batch["pixel_values"].shape[0]

    # 1. data: latents and text conditioning
    with torch.no_grad(), autocast:
        pixels = batch["pixel_values"].to(dev, non_blocking=True)
        z0 = m.vae.encode(pixels).latent_dist.sample().float() * m.vae.config.scaling_factor
        cond = encode_text(m.tokenizers, m.text_encoders, batch["text"], args.resolution, dev)
    uncond = zero_uncond(cond)

    # 2. start index k from the phase's mixture; x_t on the teacher's trailing grid (pure noise at k = 0)
    K = args.num_teacher_steps
    m.teacher_sched.set_timesteps(K, device=dev)  # also resets the multistep solver's state
    ts = m.teacher_sched.timesteps
    k = common.sample_start_index(m.start_probs[phase])
    t = ts[k].expand(B)
    eps = torch.randn_like(z0)
    x_t = eps if k == 0 else common.renoise(z0, eps, t, abar)

    # 3. student: one step, with the LCM boundary scalings
    with autocast:
        eps_s = denoise(m.student, x_t, t, cond)
    a = common.bcast(abar[t], x_t)
    x0_s = (x_t - (1 - a).sqrt() * eps_s) / a.sqrt()
    c_skip, c_out = (common.bcast(c, x_t) for c in common.lcm_boundary(t.float()))
    x_hat = c_skip * x_t + c_out * x0_s

    # 4. teacher: solve from ts[k] to 0 with CFG, w ~ U[g_min, g_max] once per batch
    w = float(torch.empty(()).uniform_(args.guidance_min, args.guidance_max))
    with autocast:
        x_T = teacher_solve(m, x_t, k, cond, uncond, w)

    # 5. generator losses
    l_dist, l_dmd, l_adv = (args.distill_weights[phase], args.dmd_weights[phase], args.adv_weights[phase])
    zero = torch.zeros((), device=dev)
    losses = dict(distill=zero, dmd=zero, adv=zero)
    with autocast:
        if l_dist > 0:  # 5a. distillation: one student step vs the teacher's K-step solve
            losses["distill"] = common.distill_loss(x_hat, x_T, args.distill_loss, m.decode, m.lpips)
        if l_dmd > 0:  # 5b. DMD: teacher with CFG is the real score, the student itself the fake score
            t2 = torch.randint(0, len(abar), (B,), device=dev)
            y = common.renoise(x_hat.detach(), torch.randn_like(x_hat), t2, abar)
            w2 = float(torch.empty(()).uniform_(args.guidance_min, args.guidance_max))
            with torch.no_grad():
                with teacher_mode(m.unet):
                    e_real = cfg_eps(m.unet, y, t2, cond, uncond, w2)
                e_fake = denoise(m.unet, y, t2, cond)
            losses["dmd"] = common.dmd_loss(x_hat, y, e_real, e_fake, abar[t2])
        # 5c. GAN: frozen-teacher mid-block features of re-noised fake and real latents, same noise
        s = torch.tensor(GAN_TIMESTEPS, device=dev)[torch.randint(0, len(GAN_TIMESTEPS), (B,), device=dev)]
        n = torch.randn_like(x_hat)
        real = x_T if args.teacher_as_real else z0
        fake_in = common.renoise(x_hat if l_adv > 0 else x_hat.detach(), n, s, abar)
        # the real half needs no gradient: run apart, it saves no activations for the backward
        with torch.no_grad(), teacher_mode(m.unet):
            f_real = mid_features(m.unet, common.renoise(real, n, s, abar), s, cond).float()
        with torch.set_grad_enabled(l_adv > 0), teacher_mode(m.unet, no_checkpointing=True):
            f_fake = mid_features(m.unet, fake_in, s, cond).float()
        if l_adv > 0:
            m.disc.requires_grad_(False)  # D is not trained by the generator's loss
            losses["adv"] = common.gan_g_loss(m.disc(f_fake).float(), args.gan_loss)
    loss_g = l_dist * losses["distill"] + l_dmd * losses["dmd"] + l_adv * losses["adv"]
    m.opt_g.zero_grad(set_to_none=True)
    loss_g.backward()
    m.disc.requires_grad_(True)

    # 6. discriminator update on the detached fake (and real) features, in every phase
    with autocast:
        logits_real, logits_fake = m.disc_ddp(torch.cat([f_real, f_fake]).detach()).float().chunk(2)
        losses["disc"] = common.gan_d_loss(logits_real, logits_fake, args.gan_loss)
    m.opt_d.zero_grad(set_to_none=True)
    losses["disc"].backward()

    # 7. skip both updates if any rank saw a non-finite loss (one small all-reduce, also carrying stop)
    nonfinite, stop = common.check_finite_and_stop([loss_g, losses["disc"]], stop_requested, dev)
    if not nonfinite:
        m.opt_g.step()
        m.opt_d.step()
    losses.update(loss_g=loss_g, t=t[0].float(), w=torch.tensor(w, device=dev))
    return {k_: v.detach() for k_, v in losses.items()}, not nonfinite, stop


# ------------------------------------------------------------------------------------------------------
# validation, export, checkpoints
# ------------------------------------------------------------------------------------------------------

@torch.no_grad()
def sample_grid(m, args, step):
    """Teacher (DPM-Solver++, 25 steps, CFG 7.5) beside the student (LCM, 1/2/4 steps, no CFG), on the
    validation prompts with a fixed generator; rows are prompts. The pipeline's unconditional input for an
    empty negative prompt is zeroed embeddings, as in training."""
    pipe = StableDiffusionXLPipeline(
        vae=m.vae, text_encoder=m.text_encoders[0], text_encoder_2=m.text_encoders[1], tokenizer=m.tokenizers[0],
        tokenizer_2=m.tokenizers[1], unet=m.unet, force_zeros_for_empty_prompt=True,
        scheduler=LCMScheduler.from_config(m.sched_config, timestep_spacing="trailing"))
    pipe.set_progress_bar_config(disable=True)
    autocast = torch.autocast(m.device.type, dtype=torch.bfloat16, enabled=args.mixed_precision == "bf16")

    def run(steps, guidance):
        g = torch.Generator(m.device).manual_seed(args.seed)
        with autocast:
            return pipe(args.validation_prompts, num_inference_steps=steps, guidance_scale=guidance, generator=g,
                        height=args.resolution, width=args.resolution).images

    columns = {f"student {n} step{'s' * (n > 1)}": run(n, 0.0) for n in (1, 2, 4)}
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(m.sched_config, algorithm_type="dpmsolver++")
    with teacher_mode(m.unet):
        columns = {"teacher 25 steps": run(25, 7.5), **columns}
    grid = common.image_grid([list(r) for r in zip(*columns.values())], labels=list(columns))
    path = os.path.join(args.output_dir, "samples", f"step_{step:06d}.png")
    grid.save(path)
    return path


def export_lora(unet, out_dir):
    """pytorch_lora_weights.safetensors that StableDiffusionXLPipeline.load_lora_weights(out_dir) loads,
    with the LoRA config (rank, alpha) in its metadata so the scale is right."""
    StableDiffusionXLPipeline.save_lora_weights(
        out_dir, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())


# ------------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------------

class Models:
    """Plain holder of what a training step needs (no behaviour)."""


def main(argv=None):
    args = parse_args(argv)
    resume_dir = check_args(args)
    rank, world_size, device, log = common.start_run(args)

    m = Models()
    m.args, m.device = args, device
    m.lpips = common.make_lpips().to(device).requires_grad_(False).eval() if args.distill_loss == "lpips" else None
    weight_dtype = torch.bfloat16 if args.mixed_precision == "bf16" and device.type == "cuda" else torch.float32
    models = load_models(args, device, weight_dtype)
    m.tokenizers, m.text_encoders, m.vae, m.unet, m.teacher_sched, m.sched_config = models
    m.alphas_cumprod = m.teacher_sched.alphas_cumprod.to(device, torch.float32)
    m.decode = lambda z: m.vae.decode(z / m.vae.config.scaling_factor).sample
    m.start_probs = [common.start_index_probs(args.num_teacher_steps, pi, args.timestep_distribution)
                     for pi in common.MODE_PROBS]

    # discriminator head, sized from the mid-block feature shape at this resolution
    latent = args.resolution // 2 ** (len(m.vae.config.block_out_channels) - 1)
    with torch.no_grad(), teacher_mode(m.unet):
        z = torch.zeros(1, m.unet.config.in_channels, latent, latent, device=device, dtype=weight_dtype)
        probe = zero_uncond(encode_text(m.tokenizers, m.text_encoders, [""], args.resolution, device))
        f = mid_features(m.unet, z, torch.zeros(1, device=device, dtype=torch.long), probe)
    m.disc = make_discriminator(f.shape[1], f.shape[-1]).to(device)
    if args.compile:  # in place, before DDP wraps the student
        common.compile_blocks(m.unet, COMPILE_BLOCKS)
    m.student, m.disc_ddp, m.opt_g, m.opt_d, step, counters = common.make_trainable(
        m.unet, m.disc, args, device, world_size, resume_dir, log)
    total = sum(args.phase_steps) if args.max_steps is None else min(args.max_steps, sum(args.phase_steps))
    loader = common.make_loader(args.shards, args.resolution, args.batch_size, args.num_workers,
                                args.min_aesthetic, seed=args.seed + 100_003 * step)  # a resumed run reads new samples

    stop_signal = common.StopSignal()
    tally, last = common.Tally(counters), {}
    bar = tqdm(total=total, initial=step, disable=rank != 0, desc="flash_sdxl", dynamic_ncols=True)
    data = iter(loader)
    try:
        while step < total:
            t_step = time.time()
            losses, updated, stop = train_step(m, next(data), step, args, stop_signal.requested)
            step += tally.record(losses, updated, time.time() - t_step, step, log, args.output_dir)
            bar.update(int(updated))
            if updated and (step % args.log_every == 0 or step == total):
                last = tally.flush(args, step, loader, device, log)
                bar.set_postfix(g=f"{last['loss_g']:.4f}", d=f"{last['disc']:.4f}")
            if updated and (step % args.sample_every == 0 or step == total):
                if rank == 0:
                    log.info(f"samples: {sample_grid(m, args, step)}")
                common.barrier()
            if updated and (step % args.checkpoint_every == 0 or step == total) or stop:
                state = common.training_state(m.unet, m.disc, m.opt_g, m.opt_d, args, step, counters, device)
                common.save_checkpoint(args.output_dir, step, state,
                                       partial(export_lora, m.unet), args.keep_checkpoints)
                log.info(f"checkpoint at step {step}")
            if stop:
                log.info(f"stop requested: saved step {step}; continue with --resume latest")
                break
        if step >= total:
            if rank == 0:
                export_lora(m.unet, args.output_dir)
                log.info(f"done: LoRA in {args.output_dir}/pytorch_lora_weights.safetensors")
            common.barrier()
    finally:
        loader.close()  # stop the data workers now, even if a traceback keeps this frame alive
        bar.close()
        stop_signal.restore()
        common.cleanup_distributed()
    m.step, m.last, m.counters = step, last, counters
    return m


if __name__ == "__main__":
    try:
        main()
    except common.UsageError as e:
        raise SystemExit(f"flash_sdxl.py: error: {e}")
