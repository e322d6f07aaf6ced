"""Flash Diffusion for Stable Diffusion 3: distil the MMDiT into a 1-4 step LoRA student.

Chadebec et al., "Flash Diffusion: Accelerating Any Conditional Diffusion Model for Few Steps Image
Generation", arXiv 2406.02347. The student (transformer + LoRA) learns to reach in one step what the teacher
(the same transformer, LoRA disabled) reaches in K Euler steps of the flow ODE with classifier-free guidance,
from start steps drawn from a Gaussian mixture that moves toward pure noise over 4 phases; a distribution-
matching (DMD) loss and an adversarial loss join after a warm-up phase.

SD3 specifics: flow matching (x_t = sigma eps + (1 - sigma) z0; the network predicts the velocity v = eps - z0
at t = 1000 sigma, so x0 = x_t - sigma v); two CLIP encoders (penultimate states padded to the joint width,
pooled projections concatenated) and T5, off by default (its 256 tokens are then zeros, as in the stock
pipeline without T5); a fixed negative prompt as the unconditional input; the VAE's shift_factor applied on
encode and decode; a discriminator on the frozen teacher's velocity prediction of the re-noised sample.

Launch (defaults are the paper's SD3 settings; phase lengths count generator updates):
    # one GPU
    python flash_sd3.py --shards "data/{00000..00999}.tar" --output_dir runs/flash_sd3
    # one node, 8 GPUs
    torchrun --standalone --nproc_per_node=8 flash_sd3.py --shards "data/{00000..00999}.tar"
    # two nodes (the same command on each; $MASTER is the first node's address)
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_id=flash --rdzv_backend=c10d \
        --rdzv_endpoint=$MASTER:29500 flash_sd3.py --shards "data/{00000..00999}.tar"
Use the result with a stock StableDiffusion3Pipeline: pipe.load_lora_weights(output_dir),
FlowMatchLCMScheduler.from_config(pipe.scheduler.config, shift=1.0), sigmas=[1.0, 0.8965, 0.7389, 0.4700]
(4 steps), guidance_scale=0. See README.md.
"""
import argparse
import contextlib
import os
import time
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FlowMatchLCMScheduler, SD3Transformer2DModel,
                       StableDiffusion3Pipeline)
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from tqdm import tqdm
from transformers import AutoTokenizer, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel
from transformers.utils import cached_file

import common

DEFAULT_PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "a red fox in a snowy forest, golden hour",
    "a bowl of ramen on a wooden table, studio lighting",
    "a watercolor painting of a lighthouse on a cliff",
]
# the unconditional input of the released Flash SD3 (gojasper/flash-diffusion, flash_sd3 model code)
NEGATIVE_PROMPT = ("deformed, distorted, disfigured, poorly drawn, bad anatomy, wrong anatomy, extra limb, missing "
                   "limb, floating limbs, mutated hands and fingers, disconnected limbs, mutation, mutated, ugly, "
                   "disgusting, blurry, amputation, NSFW")
# PixArt's list. On SD3-medium it matches, in each of the 24 blocks, attn.to_q/to_k/to_v/to_out.0, ff.net.0.proj,
# ff.net.2, ff_context.net.0.proj and the adaLN norm1.linear/norm1_context.linear; plus pos_embed.proj (the patch
# conv), the timestep and pooled-text embedders' linear_1/linear_2, norm_out.linear and proj_out. The context
# stream's add_q/k/v_proj, to_add_out, ff_context.net.2 and context_embedder match nothing. At rank 64 that is
# 87.6M parameters, + 2.8M for the head = the published 90.4M.
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "proj",
                "linear", "linear_1", "linear_2"]
T5_TOKENS = 256  # the stock pipeline's max_sequence_length; also the number of zero tokens without T5
GAN_INDICES = [-10, -250, -500, -750]  # training-grid sigmas the discriminator sees: 0.029, 0.5, 0.75, 0.9 (shift 3)
COMPILE_BLOCKS = ("JointTransformerBlock",)  # what --compile compiles, each in place
# Where the student samples, and so where it should train most. The mixture's modes sit at indices 0, K/4, K/2,
# 3K/4 of the teacher's grid: sigmas 1.0, 0.8965, 0.7389, 0.4700 for K = 32, shift 3. The stock FlowMatchLCM
# 4-step sigmas are 1.0, 0.8577, 0.6022, 0.0089: two fall between modes, where the mixture (var 0.5) puts ~1e-4 of
# its mass, and the last is nearly clean (a wasted step). Moving the modes there instead would spend half of the
# warm-up and 20-30 % of later phases at sigma = 0.0089, where x_hat = x_t to within 1 %. So the mixture keeps
# its modes and the student samples at them: n steps at indices 0, K/n, 2K/n, ... (for n = 4 the modes, for 1
# and 2 a subset), the flow-matching analogue of the trailing LCM grid (t = 999/749/499/249) of the epsilon scripts.


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    # data and model
    a("--model", default="stabilityai/stable-diffusion-3-medium-diffusers", help="hub id or local diffusers folder")
    a("--shards", nargs="+", required=True, help="webdataset tar shards: brace patterns, globs or pipe: URLs")
    a("--output_dir", default="runs/flash_sd3", help="metrics, samples, checkpoints and the final LoRA")
    a("--resolution", type=int, default=1024, help="training resolution (square; short side resized, centre crop)")
    a("--batch_size", type=int, default=2, help="images per GPU per generator update")
    a("--min_aesthetic", type=float, default=6.0, help="keep samples with json aesthetic_score >= this; <0: off")
    a("--num_workers", type=int, default=4, help="data loading processes per GPU")
    a("--use_t5", action="store_true", help="encode prompts with T5 too (default: zero T5 tokens, as released)")
    a("--negative_prompt", default=NEGATIVE_PROMPT, help="the unconditional input of CFG ('' allowed)")
    # schedule: 4 phases (paper section 3.2)
    a("--phase_steps", type=int, nargs=4, default=[2500] * 4, help="generator updates per phase")
    a("--max_steps", type=int, default=None, help="stop early after this many updates (default: sum of phases)")
    a("--num_teacher_steps", type=int, default=32, help="K: flow-matching Euler steps of the teacher's full solve")
    a("--timestep_distribution", default="mixture", choices=["mixture", "uniform", "gaussian"],
      help="start-index distribution over the K solver steps (uniform/gaussian: the paper's ablations)")
    a("--guidance_min", type=float, default=7.0, help="teacher CFG scale w ~ U[min, max], one per batch")
    a("--guidance_max", type=float, default=13.0, help="see --guidance_min")
    # losses
    a("--distill_loss", default="lpips", choices=["lpips", "l2", "l1"], help="student vs teacher output")
    a("--distill_weights", type=float, nargs=4, default=[1.0, 1.0, 1.0, 1.0], help="lambda_dist per phase")
    a("--dmd_weights", type=float, nargs=4, default=[0.0, 0.3, 0.5, 0.7], help="lambda_dmd per phase")
    a("--adv_weights", type=float, nargs=4, default=[0.0, 0.1, 0.3, 0.5], help="lambda_adv per phase")
    a("--gan_loss", default="lsgan", choices=["lsgan", "hinge", "non_saturating"], help="adversarial loss")
    a("--teacher_as_real", action="store_true", help="discriminator's real samples: teacher outputs, not data")
    # optimisation
    a("--lr", type=float, default=1e-5, help="AdamW learning rate of the LoRA (constant)")
    a("--lr_disc", type=float, default=1e-5, help="AdamW learning rate of the discriminator head (constant)")
    a("--lora_rank", type=int, default=64, help="LoRA rank r")
    a("--lora_alpha", type=float, default=8, help="LoRA alpha (scale = alpha / r)")
    a("--mixed_precision", default="bf16", choices=["bf16", "no"], help="bf16 autocast (frozen weights in bf16 on GPU)")
    a("--compile", action="store_true", help="torch.compile the transformer blocks in place (the first steps compile)")
    a("--gradient_checkpointing", action="store_true", help="trade compute for memory in the student pass")
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
        net_cfg = SD3Transformer2DModel.load_config(args.model, subfolder="transformer")
        sched_cfg = FlowMatchEulerDiscreteScheduler.load_config(args.model, subfolder="scheduler")
    except Exception as e:
        first_line = str(e).splitlines()[0] if str(e) else ""
        raise common.UsageError(f"--model {args.model}: cannot read a diffusers SD3 layout there (vae/, transformer/ "
                                f"and scheduler/ configs): {type(e).__name__}: {first_line}") from e
    if sched_cfg.get("_class_name") != "FlowMatchEulerDiscreteScheduler" or sched_cfg.get("use_dynamic_shifting"):
        raise common.UsageError(f"--model {args.model}: its scheduler is not a fixed-shift FlowMatchEulerDiscrete"
                                "Scheduler; this script distils SD3-style flow-matching models only")
    if args.use_t5:  # transformers' configs fall back to defaults silently: look for the file itself
        try:
            found = cached_file(args.model, "config.json", subfolder="text_encoder_3")
        except OSError:
            found = None
        if found is None:
            raise common.UsageError(f"--use_t5: --model {args.model} has no T5 encoder (text_encoder_3/); "
                                    "drop --use_t5")
    # the latent must split into patches (as the stock pipeline checks), and fit the position embedding
    down = 2 ** (len(vae_cfg["block_out_channels"]) - 1) * net_cfg["patch_size"]
    if args.resolution % down:
        raise common.UsageError(f"--resolution {args.resolution}: must be a multiple of {down} for this model "
                                f"(VAE downsampling x patch size), e.g. {max(down, args.resolution // down * down)}")
    if net_cfg.get("pos_embed_max_size") and args.resolution // down > net_cfg["pos_embed_max_size"]:
        raise common.UsageError(f"--resolution {args.resolution}: at most {net_cfg['pos_embed_max_size'] * down} "
                                "for this model (its position embedding's size)")
    return common.resolve_resume(args.resume, args.output_dir)


# ------------------------------------------------------------------------------------------------------
# the backbone: loading, latents, text encoding, denoiser calls
# ------------------------------------------------------------------------------------------------------

def load_models(args, device, weight_dtype):
    tokenizers = [CLIPTokenizer.from_pretrained(args.model, subfolder=s) for s in ("tokenizer", "tokenizer_2")]
    encoders = [CLIPTextModelWithProjection.from_pretrained(args.model, subfolder=s, dtype=weight_dtype)
                for s in ("text_encoder", "text_encoder_2")]
    if args.use_t5:  # 4.8B parameters: loaded only when asked for
        tokenizers.append(AutoTokenizer.from_pretrained(args.model, subfolder="tokenizer_3"))
        encoders.append(T5EncoderModel.from_pretrained(args.model, subfolder="text_encoder_3", dtype=weight_dtype))
    vae = AutoencoderKL.from_pretrained(args.model, subfolder="vae", dtype=weight_dtype)
    net = SD3Transformer2DModel.from_pretrained(args.model, subfolder="transformer", dtype=weight_dtype)
    for m in (*encoders, vae, net):
        m.requires_grad_(False).eval().to(device)
    # student = transformer + LoRA; teacher = the same transformer with the LoRA disabled (one copy of weights)
    net.add_adapter(LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, target_modules=LORA_TARGETS))
    for p in net.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # trainable LoRA weights stay fp32 under bf16 autocast
    if args.gradient_checkpointing:  # the denoiser, and the VAE decoder that the LPIPS loss backpropagates through
        net.enable_gradient_checkpointing()
        vae.enable_gradient_checkpointing()
    sched_config = FlowMatchEulerDiscreteScheduler.load_config(args.model, subfolder="scheduler")
    teacher_sched = FlowMatchEulerDiscreteScheduler.from_config(sched_config)
    return tokenizers, encoders, vae, net, teacher_sched, sched_config


def to_latent(vae, pixels):
    """z0 = (E(x) - shift_factor) * scaling_factor (the official Flash SD3 code left the shift out)."""
    z = vae.encode(pixels).latent_dist.sample().float()
    return (z - vae.config.shift_factor) * vae.config.scaling_factor


def from_latent(vae, z):
    return vae.decode(z / vae.config.scaling_factor + vae.config.shift_factor).sample


@torch.no_grad()
def encode_text(tokenizers, encoders, prompts, joint_dim, device):
    """SD3 conditioning as the stock pipeline builds it: both CLIPs' penultimate states side by side, zero-padded
    to the joint width, followed by T5's 256 states (zeros when T5 is off); pooled = both CLIP projections."""
    states, pooled = [], []
    for tokenizer, encoder in zip(tokenizers[:2], encoders[:2]):
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(device)
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
    """Velocity prediction v (= eps - z0) in fp32; sigma: (B,) noise levels, given to the network as 1000 sigma."""
    return net(hidden_states=x, timestep=1000 * sigma, encoder_hidden_states=c["text"],
               pooled_projections=c["pooled"]).sample.float()


def x0_from_v(x, v, sigma):
    """The flow's clean estimate x0 = x - sigma v: the student's one-step output and the sampler's step."""
    return x - common.bcast(sigma, x) * v


def cfg_v(net, x, sigma, cond, uncond, w):
    """Classifier-free guidance in one batched forward: cat[uncond, cond], then chunk(2)."""
    v_u, v_c = denoise(net, torch.cat([x, x]), torch.cat([sigma, sigma]), cat_cond(uncond, cond)).chunk(2)
    return v_u + w * (v_c - v_u)


@contextlib.contextmanager
def teacher_mode(net, no_checkpointing=False):
    """LoRA off: the transformer is the frozen teacher. Gradient checkpointing would recompute this pass during
    backward with the LoRA back on, so passes that backpropagate in teacher mode turn it off."""
    ckpt = no_checkpointing and net.is_gradient_checkpointing
    net.disable_adapters()
    if ckpt:
        net.disable_gradient_checkpointing()
    try:
        yield
    finally:
        net.enable_adapters()
        if ckpt:
            net.enable_gradient_checkpointing()


@torch.no_grad()
def teacher_solve(m, x_t, k, cond, uncond, w):
    """Euler steps of the flow ODE with CFG, x <- x + (sigma_next - sigma) v, from the grid's sigma_k to 0
    (m.sigmas: the teacher's K-step grid, K + 1 values ending at 0)."""
    with teacher_mode(m.transformer):
        x = x_t
        for i in range(k, len(m.sigmas) - 1):
            v = cfg_v(m.transformer, x, m.sigmas[i].expand(len(x)), cond, uncond, w)
            x = x + (m.sigmas[i + 1] - m.sigmas[i]) * v
    return x.float()


def student_sigmas(sigmas, n):
    """The sigmas of the student's n-step sampler (n in 1, 2, 4): the mixture's modes, teacher-grid indices
    j * (K // 4), every (4 // n)-th of them (see the comment at the top); pass them to a
    FlowMatchLCMScheduler configured with shift=1.0."""
    step = (len(sigmas) - 1) // 4 * (4 // n)
    return [float(sigmas[j * step]) for j in range(n)]


def make_discriminator(ch, size):
    """SD3 head (METHOD.md section 6) on the teacher's velocity prediction (16 x 128 x 128 at 1024 px): four k4 s2
    convs (64 ... 512 channels, GroupNorm and SiLU) to 8x8, then a k4 conv to a 5x5 logit map. Smaller maps skip
    the strided convs that would shrink them below 4x4 (k3 s1 instead)."""
    layers, c_in = [], ch
    for i, c_out in enumerate((64, 128, 256, 512)):
        strided = size >= 8
        layers.append(nn.Conv2d(c_in, c_out, 4, 2, 1, bias=False) if strided
                      else nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False))
        layers += [nn.SiLU()] if i == 0 else [nn.GroupNorm(4, c_out), nn.SiLU()]
        size, c_in = size // 2 if strided else size, c_out
    return nn.Sequential(*layers, nn.Conv2d(c_in, 1, min(4, size), 1, 0, bias=False), nn.Flatten())


# ------------------------------------------------------------------------------------------------------
# one training step (METHOD.md sections 3 and 7)
# ------------------------------------------------------------------------------------------------------

def train_step(m, batch, step, args, stop_requested=False):
    """One batch: one forward, a generator (LoRA) update, a discriminator update. `m` holds the models
    (see main). Returns ({loss name: tensor}, updated?, stop?)."""
    dev = m.device
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.mixed_precision == "bf16")
    phase = common.phase_of(step, args.phase_steps)
    B = batch["pixel_values"].shape[0]

    # 1. data: latents (VAE shift and scale) and text conditioning
    with torch.no_grad(), autocast:
        z0 = to_latent(m.vae, batch["pixel_values"].to(dev, non_blocking=True))
        cond = encode_text(m.tokenizers, m.text_encoders, batch["text"], m.joint_dim, dev)
    uncond = expand_cond(m.uncond, B)

    # 2. start index k from the phase's mixture; x_t at the grid's sigma_k (sigma_0 = 1: pure noise)
    k = common.sample_start_index(m.start_probs[phase])
    sigma = m.sigmas[k].expand(B)
    x_t = common.renoise_flow(z0, torch.randn_like(z0), sigma)

    # 3. student: one step, x_hat = x_t - sigma v (the flow's own x0 prediction, no boundary scalings)
    with autocast:
        v_s = denoise(m.student, x_t, sigma, cond)
    x_hat = x0_from_v(x_t, v_s, sigma)

    # 4. teacher: Euler solve from sigma_k to 0 with CFG, w ~ U[g_min, g_max] once per batch
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
        if l_dmd > 0:  # 5b. DMD at a level of the 1000-step training grid: teacher+CFG real, student fake score
            s2 = m.train_sigmas[torch.randint(0, len(m.train_sigmas), (B,), device=dev)]
            y = common.renoise_flow(x_hat.detach(), torch.randn_like(x_hat), s2)
            w2 = float(torch.empty(()).uniform_(args.guidance_min, args.guidance_max))
            with torch.no_grad():
                with teacher_mode(m.transformer):
                    v_real = cfg_v(m.transformer, y, s2, cond, uncond, w2)
                v_fake = denoise(m.transformer, y, s2, cond)
            losses["dmd"] = common.dmd_loss_flow(x_hat, y, v_real, v_fake, s2)
        # 5c. GAN: the frozen teacher's velocity prediction of re-noised fake and real latents, same noise
        gan = torch.tensor(GAN_INDICES, device=dev)[torch.randint(0, len(GAN_INDICES), (B,), device=dev)]
        s = m.train_sigmas[gan]
        n = torch.randn_like(x_hat)
        real = x_T if args.teacher_as_real else z0
        fake_in = common.renoise_flow(x_hat if l_adv > 0 else x_hat.detach(), n, s)
        # the real half needs no gradient: run apart, it saves no activations for the backward
        with torch.no_grad(), teacher_mode(m.transformer):
            f_real = denoise(m.transformer, common.renoise_flow(real, n, s), s, cond).float()
        with torch.set_grad_enabled(l_adv > 0), teacher_mode(m.transformer, no_checkpointing=True):
            f_fake = denoise(m.transformer, fake_in, s, cond).float()
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
    losses.update(loss_g=loss_g, t=1000 * sigma[0].float(), w=torch.tensor(w, device=dev))
    return {k_: v.detach() for k_, v in losses.items()}, not nonfinite, stop


# ------------------------------------------------------------------------------------------------------
# validation, export, checkpoints
# ------------------------------------------------------------------------------------------------------

@torch.no_grad()
def sample_grid(m, args, step):
    """Teacher (flow-matching Euler, 28 steps, CFG 7 with the negative prompt: the stock pipeline's defaults)
    beside the student (FlowMatchLCMScheduler at student_sigmas, 1/2/4 steps, no CFG), on the validation
    prompts with a fixed generator; rows are prompts."""
    t5 = len(m.text_encoders) > 2
    pipe = StableDiffusion3Pipeline(
        transformer=m.transformer, scheduler=FlowMatchLCMScheduler.from_config(m.sched_config, shift=1.0), vae=m.vae,
        text_encoder=m.text_encoders[0], tokenizer=m.tokenizers[0], text_encoder_2=m.text_encoders[1],
        tokenizer_2=m.tokenizers[1], text_encoder_3=m.text_encoders[2] if t5 else None,
        tokenizer_3=m.tokenizers[2] if t5 else None)
    pipe.set_progress_bar_config(disable=True)
    autocast = torch.autocast(m.device.type, dtype=torch.bfloat16, enabled=args.mixed_precision == "bf16")

    cuda = [torch.cuda.current_device()] if m.device.type == "cuda" else []

    def run(**kw):
        g = torch.Generator(m.device).manual_seed(args.seed)
        with autocast, torch.random.fork_rng(devices=cuda):  # the sampler's re-noising draws from the global RNG:
            torch.manual_seed(args.seed)  # fix it too, and leave training's RNG as it was
            return pipe(args.validation_prompts, generator=g, height=args.resolution, width=args.resolution,
                        max_sequence_length=T5_TOKENS, **kw).images

    columns = {f"student {n} step{'s' * (n > 1)}": run(sigmas=student_sigmas(m.sigmas, n), guidance_scale=0.0)
               for n in (1, 2, 4)}
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(m.sched_config)
    with teacher_mode(m.transformer):
        columns = {"teacher 28 steps": run(num_inference_steps=28, guidance_scale=7.0,
                                           negative_prompt=[args.negative_prompt] * len(args.validation_prompts)),
                   **columns}
    grid = common.image_grid([list(r) for r in zip(*columns.values())], labels=list(columns))
    path = os.path.join(args.output_dir, "samples", f"step_{step:06d}.png")
    grid.save(path)
    return path


def export_lora(net, out_dir):
    """pytorch_lora_weights.safetensors that StableDiffusion3Pipeline.load_lora_weights(out_dir) loads, with the
    LoRA config (rank, alpha) in its metadata so the scale alpha / r is right."""
    StableDiffusion3Pipeline.save_lora_weights(out_dir, transformer_lora_layers=get_peft_model_state_dict(net),
                                               transformer_lora_adapter_metadata=net.peft_config["default"].to_dict())


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
    m.tokenizers, m.text_encoders, m.vae, m.transformer, m.teacher_sched, m.sched_config = models
    # noise levels: the 1000-step training grid (DMD, GAN) and the teacher's K-step solver grid (+ the final 0)
    m.train_sigmas = m.teacher_sched.sigmas.to(device, torch.float32)
    m.teacher_sched.set_timesteps(args.num_teacher_steps, device=device)
    m.sigmas = m.teacher_sched.sigmas.to(device, torch.float32)
    m.joint_dim = m.transformer.config.joint_attention_dim
    m.uncond = encode_text(m.tokenizers, m.text_encoders, [args.negative_prompt], m.joint_dim, device)
    m.decode = partial(from_latent, m.vae)
    m.start_probs = [common.start_index_probs(args.num_teacher_steps, pi, args.timestep_distribution)
                     for pi in common.MODE_PROBS]

    # discriminator head on the teacher's velocity prediction: the latent's shape at this resolution
    latent = args.resolution // 2 ** (len(m.vae.config.block_out_channels) - 1)
    m.disc = make_discriminator(m.transformer.config.out_channels, latent).to(device)
    if args.compile:  # in place, before DDP wraps the student
        common.compile_blocks(m.transformer, COMPILE_BLOCKS)
    m.student, m.disc_ddp, m.opt_g, m.opt_d, step, counters = common.make_trainable(
        m.transformer, m.disc, args, device, world_size, resume_dir, log)
    total = sum(args.phase_steps) if args.max_steps is None else min(args.max_steps, sum(args.phase_steps))
    loader = common.make_loader(args.shards, args.resolution, args.batch_size, args.num_workers,
                                args.min_aesthetic, seed=args.seed + 100_003 * step)  # a resumed run reads new samples

    stop_signal = common.StopSignal()
    tally, last = common.Tally(counters), {}
    bar = tqdm(total=total, initial=step, disable=rank != 0, desc="flash_sd3", dynamic_ncols=True)
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
                state = common.training_state(m.transformer, m.disc, m.opt_g, m.opt_d, args, step, counters, device)
                common.save_checkpoint(args.output_dir, step, state,
                                       partial(export_lora, m.transformer), args.keep_checkpoints)
                log.info(f"checkpoint at step {step}")
            if stop:
                log.info(f"stop requested: saved step {step}; continue with --resume latest")
                break
        if step >= total:
            if rank == 0:
                export_lora(m.transformer, args.output_dir)
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
        raise SystemExit(f"flash_sd3.py: error: {e}")
