"""Flash Diffusion for PixArt-alpha: distil the DiT into a 1-4 step LoRA student.

Chadebec et al., "Flash Diffusion: Accelerating Any Conditional Diffusion Model for Few Steps Image
Generation", arXiv 2406.02347. The student (transformer + LoRA) learns to reach in one step what the teacher
(the same transformer, LoRA disabled) reaches in K DPM-Solver++ steps with classifier-free guidance, from start
steps drawn from a Gaussian mixture that moves toward pure noise over 4 phases; a distribution-matching
(DMD) loss and an adversarial loss join after a warm-up phase.

PixArt specifics: T5 text embeddings (120 tokens) with their attention mask, resolution and aspect-ratio
conditioning fixed to the training resolution, the transformer's 8 output channels (epsilon, variance) of
which the first 4 are used, the empty prompt through T5 as the unconditional input, and a discriminator
that reads the frozen teacher's epsilon prediction of the re-noised sample.

Launch (defaults are the paper's PixArt settings; phase lengths count generator updates):
    # one GPU
    python flash_pixart.py --shards "data/{00000..00999}.tar" --output_dir runs/flash_pixart
    # one node, 8 GPUs
    torchrun --standalone --nproc_per_node=8 flash_pixart.py --shards "data/{00000..00999}.tar"
    # two nodes (the same command on each; $MASTER is the first node's address)
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_id=flash --rdzv_backend=c10d \
        --rdzv_endpoint=$MASTER:29500 flash_pixart.py --shards "data/{00000..00999}.tar"
Use the result with a stock PixArtAlphaPipeline: PeftModel.from_pretrained(pipe.transformer, output_dir),
LCMScheduler (timestep_spacing="trailing"), 4 steps, guidance_scale=0. See README.md.
"""
import argparse
import contextlib
import math
import os
import time
from functools import partial

import torch
import torch.nn as nn
from diffusers import (AutoencoderKL, DPMSolverMultistepScheduler, LCMScheduler, PixArtAlphaPipeline,
                       PixArtTransformer2DModel)
from peft import LoraConfig, get_peft_model
from tqdm import tqdm
from transformers import AutoTokenizer, T5EncoderModel

import common

DEFAULT_PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "a red fox in a snowy forest, golden hour",
    "a bowl of ramen on a wooden table, studio lighting",
    "a watercolor painting of a lighthouse on a cliff",
]
# On PixArt-XL-2-1024-MS these match: attn1/attn2 to_q, to_k, to_v, to_out.0 and ff.net.0.proj, ff.net.2 of
# the 28 blocks; pos_embed.proj (the patch conv); proj_out; adaln_single.linear; the linear_1/linear_2 of
# the timestep, resolution and aspect-ratio embedders and of caption_projection. proj_in matches nothing.
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "proj",
                "linear", "linear_1", "linear_2"]
MAX_TOKENS = 120  # T5 sequence length of PixArt-alpha
GAN_TIMESTEPS = [10, 250, 500, 750]  # noise levels the discriminator sees, one drawn per sample
COMPILE_BLOCKS = ("BasicTransformerBlock",)  # what --compile compiles, each in place


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    # data and model
    a("--model", default="PixArt-alpha/PixArt-XL-2-1024-MS", help="hub id or local diffusers folder")
    a("--shards", nargs="+", required=True, help="webdataset tar shards: brace patterns, globs or pipe: URLs")
    a("--output_dir", default="runs/flash_pixart", help="metrics, samples, checkpoints and the final LoRA")
    a("--resolution", type=int, default=1024, help="training resolution (square; short side resized, centre crop)")
    a("--batch_size", type=int, default=2, help="images per GPU per generator update")
    a("--min_aesthetic", type=float, default=6.0, help="keep samples with json aesthetic_score >= this; <0: off")
    a("--num_workers", type=int, default=4, help="data loading processes per GPU")
    # schedule: 4 phases (paper section 3.2)
    a("--phase_steps", type=int, nargs=4, default=[5000] * 4, help="generator updates per phase")
    a("--max_steps", type=int, default=None, help="stop early after this many updates (default: sum of phases)")
    a("--num_teacher_steps", type=int, default=16, help="K: DPM-Solver++ steps of the teacher's full solve")
    a("--timestep_distribution", default="mixture", choices=["mixture", "uniform", "gaussian"],
      help="start-index distribution over the K solver steps (uniform/gaussian: the paper's ablations)")
    a("--guidance_min", type=float, default=2.0, help="teacher CFG scale w ~ U[min, max], one per batch")
    a("--guidance_max", type=float, default=9.0, help="see --guidance_min")
    # losses
    a("--distill_loss", default="lpips", choices=["lpips", "l2", "l1"], help="student vs teacher output")
    a("--distill_weights", type=float, nargs=4, default=[1.0, 1.0, 1.0, 1.0], help="lambda_dist per phase")
    a("--dmd_weights", type=float, nargs=4, default=[0.0, 0.3, 0.5, 0.7], help="lambda_dmd per phase")
    a("--adv_weights", type=float, nargs=4, default=[0.0, 0.05, 0.1, 0.2], help="lambda_adv per phase")
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
        net_cfg = PixArtTransformer2DModel.load_config(args.model, subfolder="transformer")
    except Exception as e:
        first_line = str(e).splitlines()[0] if str(e) else ""
        raise common.UsageError(f"--model {args.model}: cannot read a diffusers PixArt layout there (vae/ and "
                                f"transformer/ configs): {type(e).__name__}: {first_line}") from e
    # the latent must split into patches; the stock pipeline (validation) wants multiples of 8
    down = 2 ** (len(vae_cfg["block_out_channels"]) - 1) * net_cfg["patch_size"]
    factor = math.lcm(8, down)
    if args.resolution % factor:
        example = max(factor, args.resolution // factor * factor)
        raise common.UsageError(f"--resolution {args.resolution}: must be a multiple of {factor} for this model "
                                f"(VAE downsampling, patch size), e.g. {example}")
    return common.resolve_resume(args.resume, args.output_dir)


# ------------------------------------------------------------------------------------------------------
# the backbone: loading, text encoding, denoiser calls, features for the discriminator
# ------------------------------------------------------------------------------------------------------

def load_models(args, device, weight_dtype):
    tokenizer = AutoTokenizer.from_pretrained(args.model, subfolder="tokenizer")
    text_encoder = T5EncoderModel.from_pretrained(args.model, subfolder="text_encoder", dtype=weight_dtype)
    vae = AutoencoderKL.from_pretrained(args.model, subfolder="vae", dtype=weight_dtype)
    net = PixArtTransformer2DModel.from_pretrained(args.model, subfolder="transformer", dtype=weight_dtype)
    for m in (text_encoder, vae, net):
        m.requires_grad_(False).eval().to(device)
    # student = transformer + LoRA; teacher = the same transformer with the LoRA disabled (one copy of weights).
    # The PixArt transformer has no diffusers LoRA loader: it becomes a PeftModel, which is also the format
    # users load it back in (PeftModel.from_pretrained)
    net = get_peft_model(net, LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, target_modules=LORA_TARGETS))
    for p in net.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # trainable LoRA weights stay fp32 under bf16 autocast
    if args.gradient_checkpointing:  # the denoiser, and the VAE decoder that the LPIPS loss backpropagates through
        net.enable_gradient_checkpointing()
        vae.enable_gradient_checkpointing()
    sched_config = DPMSolverMultistepScheduler.load_config(args.model, subfolder="scheduler")
    teacher_sched = DPMSolverMultistepScheduler.from_config(
        sched_config, algorithm_type="dpmsolver++", solver_order=2, timestep_spacing="trailing",
        final_sigmas_type="zero")
    return tokenizer, text_encoder, vae, net, teacher_sched, sched_config


@torch.no_grad()
def encode_text(tokenizer, text_encoder, prompts, resolution, device, sizes=True):
    """PixArt conditioning, batch-first: T5 states (B, 120, 4096) and their attention mask, as the stock
    pipeline makes them (prompts lower-cased and stripped), plus, with `sizes` (the 1024 px model, whose
    sample_size is 128, as the pipeline decides), the resolution and aspect-ratio conditioning."""
    prompts = [p.lower().strip() for p in prompts]
    tokens = tokenizer(prompts, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                       add_special_tokens=True, return_tensors="pt")
    mask = tokens.attention_mask.to(device)
    text = text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]
    if not sizes:
        return dict(text=text, mask=mask)
    B = len(prompts)
    return dict(text=text, mask=mask, aspect_ratio=torch.ones(B, 1, device=device, dtype=text.dtype),
                resolution=torch.tensor([[resolution, resolution]] * B, device=device, dtype=text.dtype))


def cat_cond(*conds):
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}


def expand_cond(c, B):
    return {k: v.expand(B, *v.shape[1:]) for k, v in c.items()}


def denoise(net, x, t, c):
    """epsilon prediction in fp32 (the first 4 of the 8 output channels; the others are the variance)."""
    added = dict(resolution=c.get("resolution"), aspect_ratio=c.get("aspect_ratio"))
    out = net(x, encoder_hidden_states=c["text"], encoder_attention_mask=c["mask"], timestep=t,
              added_cond_kwargs=added).sample
    return out[:, : x.shape[1]].float()


def cfg_eps(net, x, t, cond, uncond, w):
    """Classifier-free guidance in one batched forward: cat[uncond, cond], then chunk(2)."""
    e_u, e_c = denoise(net, torch.cat([x, x]), torch.cat([t, t]), cat_cond(uncond, cond)).chunk(2)
    return e_u + w * (e_c - e_u)


@contextlib.contextmanager
def teacher_mode(net, no_checkpointing=False):
    """LoRA off: the transformer is the frozen teacher. Gradient checkpointing would recompute this pass during
    backward with the LoRA back on, so passes that backpropagate in teacher mode turn it off."""
    ckpt = no_checkpointing and net.is_gradient_checkpointing
    if ckpt:
        net.disable_gradient_checkpointing()
    try:
        with net.disable_adapter():
            yield
    finally:
        if ckpt:
            net.enable_gradient_checkpointing()


@torch.no_grad()
def teacher_solve(m, x_t, k, cond, uncond, w):
    """K-step DPM-Solver++ with CFG from ts[k] down to 0 (m.teacher_sched.set_timesteps(K) done by the
    caller, which also resets the solver's multistep state)."""
    with teacher_mode(m.transformer):
        x = x_t
        for tau in m.teacher_sched.timesteps[k:]:
            e = cfg_eps(m.transformer, x, tau.expand(len(x)), cond, uncond, w)
            x = m.teacher_sched.step(e, tau, x).prev_sample
    return x.float()


def make_discriminator(ch, size):
    """PixArt head (METHOD.md section 6) on the teacher's epsilon prediction (4 x 128 x 128 at 1024 px):
    five k4 s2 convs (64 ... 1024 channels, GroupNorm and SiLU) to 4x4, then one logit. Smaller maps skip
    the strided convs that would shrink them below 4x4 (k3 s1 instead) and end in a logit map."""
    layers, c_in = [], ch
    for i, c_out in enumerate((64, 128, 256, 512, 1024)):
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
        cond = encode_text(m.tokenizer, m.text_encoder, batch["text"], args.resolution, dev, m.sizes)
    uncond = expand_cond(m.uncond, B)

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
                with teacher_mode(m.transformer):
                    e_real = cfg_eps(m.transformer, y, t2, cond, uncond, w2)
                e_fake = denoise(m.transformer, y, t2, cond)
            losses["dmd"] = common.dmd_loss(x_hat, y, e_real, e_fake, abar[t2])
        # 5c. GAN: the frozen teacher's epsilon prediction of re-noised fake and real latents, same noise
        s = torch.tensor(GAN_TIMESTEPS, device=dev)[torch.randint(0, len(GAN_TIMESTEPS), (B,), device=dev)]
        n = torch.randn_like(x_hat)
        real = x_T if args.teacher_as_real else z0
        fake_in = common.renoise(x_hat if l_adv > 0 else x_hat.detach(), n, s, abar)
        # the real half needs no gradient: run apart, it saves no activations for the backward
        with torch.no_grad(), teacher_mode(m.transformer):
            f_real = denoise(m.transformer, common.renoise(real, n, s, abar), s, cond).float()
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
    losses.update(loss_g=loss_g, t=t[0].float(), w=torch.tensor(w, device=dev))
    return {k_: v.detach() for k_, v in losses.items()}, not nonfinite, stop


# ------------------------------------------------------------------------------------------------------
# validation, export, checkpoints
# ------------------------------------------------------------------------------------------------------

@torch.no_grad()
def sample_grid(m, args, step):
    """Teacher (DPM-Solver++, 20 steps, CFG 4.5: the stock pipeline's defaults) beside the student (LCM,
    1/2/4 steps, no CFG), on the validation prompts with a fixed generator; rows are prompts."""
    pipe = PixArtAlphaPipeline(vae=m.vae, text_encoder=m.text_encoder, tokenizer=m.tokenizer,
                               transformer=m.transformer,
                               scheduler=LCMScheduler.from_config(m.sched_config, timestep_spacing="trailing"))
    pipe.set_progress_bar_config(disable=True)
    autocast = torch.autocast(m.device.type, dtype=torch.bfloat16, enabled=args.mixed_precision == "bf16")

    def run(steps, guidance):
        g = torch.Generator(m.device).manual_seed(args.seed)
        with autocast:
            return pipe(args.validation_prompts, num_inference_steps=steps, guidance_scale=guidance, generator=g,
                        height=args.resolution, width=args.resolution, use_resolution_binning=False,
                        clean_caption=False).images  # lower-cased and stripped, as in training

    columns = {f"student {n} step{'s' * (n > 1)}": run(n, 0.0) for n in (1, 2, 4)}
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(m.sched_config, algorithm_type="dpmsolver++")
    with teacher_mode(m.transformer):
        columns = {"teacher 20 steps": run(20, 4.5), **columns}
    grid = common.image_grid([list(r) for r in zip(*columns.values())], labels=list(columns))
    path = os.path.join(args.output_dir, "samples", f"step_{step:06d}.png")
    grid.save(path)
    return path


def export_lora(net, out_dir):
    """A PEFT adapter folder (adapter_config.json with rank and alpha, adapter_model.safetensors) that
    PeftModel.from_pretrained(pipe.transformer, out_dir) loads into a stock PixArtAlphaPipeline."""
    net.save_pretrained(out_dir)


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
    m.tokenizer, m.text_encoder, m.vae, m.transformer, m.teacher_sched, m.sched_config = models
    m.alphas_cumprod = m.teacher_sched.alphas_cumprod.to(device, torch.float32)
    m.sizes = m.transformer.config.sample_size == 128  # size conditioning, as the stock pipeline decides
    m.uncond = encode_text(m.tokenizer, m.text_encoder, [""], args.resolution, device, m.sizes)  # empty prompt
    m.decode = lambda z: m.vae.decode(z / m.vae.config.scaling_factor).sample
    m.start_probs = [common.start_index_probs(args.num_teacher_steps, pi, args.timestep_distribution)
                     for pi in common.MODE_PROBS]

    # discriminator head on the teacher's epsilon prediction: the latent's shape at this resolution
    latent = args.resolution // 2 ** (len(m.vae.config.block_out_channels) - 1)
    m.disc = make_discriminator(m.transformer.config.in_channels, latent).to(device)
    if args.compile:  # in place, before DDP wraps the student
        common.compile_blocks(m.transformer, COMPILE_BLOCKS)
    m.student, m.disc_ddp, m.opt_g, m.opt_d, step, counters = common.make_trainable(
        m.transformer, m.disc, args, device, world_size, resume_dir, log)
    total = sum(args.phase_steps) if args.max_steps is None else min(args.max_steps, sum(args.phase_steps))
    loader = common.make_loader(args.shards, args.resolution, args.batch_size, args.num_workers,
                                args.min_aesthetic, seed=args.seed + 100_003 * step)  # a resumed run reads new samples

    stop_signal = common.StopSignal()
    tally, last = common.Tally(counters), {}
    bar = tqdm(total=total, initial=step, disable=rank != 0, desc="flash_pixart", dynamic_ncols=True)
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
                log.info(f"done: LoRA (PEFT adapter) in {args.output_dir}")
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
        raise SystemExit(f"flash_pixart.py: error: {e}")
