"""Training-step speed and memory of the flash_*.py scripts, beside the original code's step pattern.

Each script's own `train_step` runs on synthetic data of the real shapes, on models that its own `build()`
makes in memory (`--size tiny`: the tests' configs; `--size real`: the released architectures, random
weights). Beside it, on the same models, runs a *reference pattern* step: what the original code did (see
`reference_step`). Reported: seconds per update, samples/s, peak memory, FLOPs per update and MFU, and the
speed-up and memory ratio against the reference.

    python bench/speed.py --backbone all --size tiny --device cpu
    python bench/speed.py --backbone sdxl --size real --batch_size 2 --compile --warmup 2 --steps 5   # GPU

Every measured step does the same work: phase 3's loss weights (`--phase`) and a fixed teacher start index,
by default the mean over the phases' mixtures (18 of K = 32 solver steps for SD1.5). Nothing is downloaded:
LPIPS has a random VGG16 trunk (the real one's compute), the tokenizers are byte-level with the real
lengths, and at --size real PixArt's T5-XXL is a T5 of its width with 2 of its 24 layers.
"""
import argparse
import contextlib
import copy
import datetime
import gc
import importlib
import json
import logging
import math
import os
import platform
import resource
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here needs the Hub; never wait on it
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import peft  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import common  # noqa: E402
from models import build_parts, models_from_memory  # noqa: E402  (bench/models.py)

BACKBONES = ["sd", "sdxl", "adapter", "pixart", "sd3", "flux"]
OUT_DIR = os.path.join("~", ".cache", "flash_speed")  # outside the repository: a run leaves it untouched


# ------------------------------------------------------------------------------------------------------
# per backbone, for the reference pattern: its conditioning, batch-first, and the function of the script
# that gives the discriminator its features
# ------------------------------------------------------------------------------------------------------

def encode_sd(mod, m, batch, args):
    cond = mod.encode_text(m.tokenizer, m.text_encoder, batch["text"], m.device)
    return cond, m.uncond.expand(len(batch["text"]), -1, -1)


def encode_sdxl(mod, m, batch, args):
    cond = mod.encode_text(m.tokenizers, m.text_encoders, batch["text"], args.resolution, m.device)
    if "edges" in batch:  # the adapter's residuals go to every call, both CFG halves included
        edges = batch["edges"].to(m.device, non_blocking=True)
        cond["adapter"] = mod.adapter_residuals(m.adapter, edges, args.adapter_conditioning_scale)
    return cond, mod.zero_uncond(cond)


def encode_pixart(mod, m, batch, args):
    cond = mod.encode_text(m.tokenizer, m.text_encoder, batch["text"], args.resolution, m.device, m.sizes)
    return cond, mod.expand_cond(m.uncond, len(batch["text"]))


@dataclass
class Backbone:
    script: str  # module name of the script
    encode: Optional[Callable] = None  # (mod, m, batch, args) -> (cond, uncond); None: no reference pattern
    features: str = "mid_features"  # the script's function that gives the discriminator's input
    notes: list = field(default_factory=list)


SPECS = {
    "sd": Backbone("flash_sd", encode=encode_sd),
    "sdxl": Backbone("flash_sdxl", encode=encode_sdxl),
    "adapter": Backbone("flash_adapter", encode=encode_sdxl),
    "pixart": Backbone("flash_pixart", encode=encode_pixart, features="denoise",
                       notes=["T5: width 4096, 2 of T5-XXL's 24 layers at --size real"]),
    "sd3": Backbone("flash_sd3", notes=[
        "T5 as in the script's default (off unless its flag turns it on)",
        "no reference pattern: it is written for epsilon prediction"]),
    "flux": Backbone("flash_flux", notes=[
        "T5: width 4096, 2 of T5-XXL's 24 layers at --size real; gradient checkpointing on (the script's default)",
        "no reference pattern: it is written for epsilon prediction"]),
}


# ------------------------------------------------------------------------------------------------------
# one backbone's step, built the way its script's main() builds it
# ------------------------------------------------------------------------------------------------------

def script_args(mod, opts):
    """The script's own defaults (paper values) through its own parser, with the benchmark's overrides."""
    argv = ["--shards", "synthetic", "--model", "in-memory", "--mixed_precision", opts.mixed_precision,
            "--distill_loss", opts.distill_loss, "--seed", str(opts.seed)]
    if opts.resolution or opts.size == "tiny":
        argv += ["--resolution", str(opts.resolution or 32)]  # tiny: the tests' 32 px
    if opts.batch_size:
        argv += ["--batch_size", str(opts.batch_size)]
    if opts.num_teacher_steps:
        argv += ["--num_teacher_steps", str(opts.num_teacher_steps)]
    argv += ["--compile"] * opts.compile + ["--gradient_checkpointing"] * opts.gradient_checkpointing
    args = mod.parse_args(argv)
    if hasattr(args, "adapter"):
        args.adapter = "adapter"  # the key build_parts stores it under
    if hasattr(args, "variant"):
        args.variant = "alpha"  # the in-memory PixArt has PixArt-alpha's layout (no folder to read it from)
    return args


def default_start_index(K):
    """The mean start index over the 4 phases' mixtures (equal phase lengths)."""
    means = [float((torch.arange(K) * common.start_index_probs(K, pi)).sum()) for pi in common.MODE_PROBS]
    return int(round(sum(means) / len(means)))


def build_step(name, opts, device):
    """Models, optimizers and a synthetic batch for one backbone, as a dict of what the steps need."""
    spec = SPECS[name]
    mod = importlib.import_module(spec.script)
    args = script_args(mod, opts)
    K = args.num_teacher_steps
    k = default_start_index(K) if opts.start_index is None else opts.start_index
    if not 0 <= k < K:  # before any model is built
        raise ValueError(f"--start_index {k}: must be in 0..{K - 1} (K = {K} for {name})")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as the scripts' main()
    torch.manual_seed(args.seed)

    parts = build_parts(name, opts.size, device, args.seed)
    den = parts.get("unet", parts.get("transformer"))
    unit = 2 ** (len(parts["vae"].config.block_out_channels) - 1) * (
        2 ** (len(den.config.block_out_channels) - 1) if "block_out_channels" in den.config
        else 2 if name == "flux" else den.config.patch_size)  # FLUX: 2x2 packing
    if args.resolution % math.lcm(8, unit):
        raise ValueError(f"--resolution {args.resolution}: must be a multiple of {math.lcm(8, unit)} for {name}")
    params = sum(p.numel() for p in den.parameters())
    with models_from_memory(mod, parts):
        m = mod.build(args, device)
    student = m.denoiser  # the LoRA-carrying denoiser, under the same name in every script
    if args.compile:
        mod.compile_blocks(student)  # the script's own regional compile
    fused = dict(fused=True) if device.type == "cuda" else {}
    m.start_probs = [torch.nn.functional.one_hot(torch.tensor(k), K).double()] * 4  # k in every phase

    g = torch.Generator().manual_seed(args.seed)
    B, H = args.batch_size, args.resolution
    batch = dict(pixel_values=torch.rand(B, 3, H, H, generator=g) * 2 - 1,
                 text=[f"a photograph of a red fox number {i} in a snowy forest, golden hour" for i in range(B)])
    if name == "adapter":  # the edge map its loader yields
        batch["edges"] = (torch.rand(B, m.adapter.config.in_channels, H, H, generator=g) > 0.9).float()
    if device.type == "cuda":
        batch = {key: v.pin_memory() if torch.is_tensor(v) else v for key, v in batch.items()}
    # one process: the student and the head unwrapped, an AdamW for each, as the script's main() makes them
    return dict(name=name, spec=spec, mod=mod, m=m, args=args, batch=batch, step=sum(args.phase_steps[:opts.phase]),
                k=k, K=K, params=params, student=student, disc=m.disc,
                opt_g=torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=args.lr, **fused),
                opt_d=torch.optim.AdamW(m.disc.parameters(), lr=args.lr_disc, **fused))


def finite(*losses):
    return bool(torch.stack([torch.isfinite(l).all() for l in losses]).all())


def optimizer_steps(b, losses):
    """What the script's loop does after train_step: both updates if every loss is finite."""
    ok = finite(losses["loss_g"], losses["disc"])
    if ok:
        b["opt_g"].step()
        b["opt_d"].step()
    b["opt_g"].zero_grad(set_to_none=True)
    b["opt_d"].zero_grad(set_to_none=True)
    return losses, ok


# ------------------------------------------------------------------------------------------------------
# the reference pattern: what the original code did, on the same models and with the same losses
# ------------------------------------------------------------------------------------------------------

def autocast(b):
    return torch.autocast(b["m"].device.type, dtype=torch.bfloat16, enabled=b["args"].mixed_precision == "bf16")


def guidance(args):
    return float(torch.empty(()).uniform_(args.guidance_min, args.guidance_max))


def cat(a, b):
    """Two conditionings along the batch: tensors, lists of them (the adapter's residuals), dicts of these."""
    if isinstance(a, dict):
        return {k: cat(a[k], b[k]) for k in a}
    return [cat(x, y) for x, y in zip(a, b)] if isinstance(a, list) else torch.cat([a, b])


def make_reference_teacher(b):
    """A separate fp32 deep copy of the denoiser without its LoRA, as the original kept for the teacher and
    the discriminator's features."""
    teacher = copy.deepcopy(b["student"])
    if isinstance(teacher, peft.PeftModel):
        teacher = teacher.unload()  # PixArt's get_peft_model wrapper: the base model, LoRA layers removed
    else:
        teacher.unload_lora()  # diffusers add_adapter
    teacher.float().requires_grad_(False).eval()
    if getattr(teacher, "is_gradient_checkpointing", False):
        teacher.disable_gradient_checkpointing()
    return teacher


def reference_step(b, teacher):
    """One batch the original way, with the same losses, solver steps and models, so that the difference is
    the pattern alone: the teacher is a separate fp32 copy (make_reference_teacher), cond and uncond are two
    passes of it, the discriminator's features come from it for fake and real as one batch with a
    gradient, and the discriminator update runs the whole forward again (the original ran its forward once
    per optimizer). That second pass skips the G-only losses (LPIPS, DMD), which favours the reference."""
    spec, mod, m, args = b["spec"], b["mod"], b["m"], b["args"]
    dev, abar, K = m.device, m.alphas_cumprod, args.num_teacher_steps
    phase = common.phase_of(b["step"], args.phase_steps)
    l_dist, l_dmd, l_adv = args.distill_weights[phase], args.dmd_weights[phase], args.adv_weights[phase]

    def cfg_two_passes(x, t, cond, uncond, w):
        e_u = mod.denoise(teacher, x, t, uncond)
        return e_u + w * (mod.denoise(teacher, x, t, cond) - e_u)

    def forward(grad):  # steps 1-4 of the scripts' train_step, with the teacher as above
        with torch.no_grad(), autocast(b):
            pixels = b["batch"]["pixel_values"].to(dev, non_blocking=True)
            z0 = m.vae.encode(pixels).latent_dist.sample().float() * m.vae.config.scaling_factor
            cond, uncond = spec.encode(mod, m, b["batch"], args)
        m.teacher_sched.set_timesteps(K, device=dev)  # also resets the solver's state
        k = common.sample_start_index(m.start_probs[phase])
        t = m.teacher_sched.timesteps[k].expand(len(z0))
        eps = torch.randn_like(z0)
        x = eps if k == 0 else common.renoise(z0, eps, t, abar)
        with torch.set_grad_enabled(grad), autocast(b):
            x_hat = common.lcm_x0(x, mod.denoise(b["student"], x, t, cond), t, abar)
        with torch.no_grad(), autocast(b):
            w = guidance(args)
            for tau in m.teacher_sched.timesteps[k:]:
                x = m.teacher_sched.step(cfg_two_passes(x, tau.expand(len(x)), cond, uncond, w), tau, x).prev_sample
        return z0, cond, uncond, x_hat, x.float()

    def features(z0, x_hat, x_T, cond):  # (fake, real)
        levels = torch.tensor(mod.GAN_TIMESTEPS, device=dev)
        s, n = levels[torch.randint(0, len(levels), (len(x_hat),), device=dev)], torch.randn_like(x_hat)
        real = x_T if args.teacher_as_real else z0
        s_noise = common.renoise_level(s, m.teacher_sched.timesteps, args.renoise)  # the original's add_noise
        x_in = torch.cat([common.renoise(x_hat, n, s_noise, abar), common.renoise(real, n, s_noise, abar)])
        return getattr(mod, spec.features)(teacher, x_in, torch.cat([s, s]), cat(cond, cond)).float().chunk(2)

    z0, cond, uncond, x_hat, x_T = forward(grad=True)
    zero = torch.zeros((), device=dev)
    losses = dict(distill=zero, dmd=zero, adv=zero)
    with autocast(b):
        if l_dist > 0:
            losses["distill"] = common.distill_loss(x_hat, x_T, args.distill_loss, m.decode, m.lpips)
        if l_dmd > 0:
            t2 = torch.randint(0, len(abar), (len(x_hat),), device=dev)
            t2_noise = common.renoise_level(t2, m.teacher_sched.timesteps, args.renoise)
            y = common.renoise(x_hat.detach(), torch.randn_like(x_hat), t2_noise, abar)
            w2 = guidance(args)
            with torch.no_grad():
                e_real = cfg_two_passes(y, t2, cond, uncond, w2)
                e_fake = mod.denoise(b["student"], y, t2, cond)
            losses["dmd"] = common.dmd_loss(x_hat, y, e_real, e_fake, abar[t2])
        if l_adv > 0:
            m.disc.requires_grad_(False)
            losses["adv"] = common.gan_g_loss(m.disc(features(z0, x_hat, x_T, cond)[0]).float(), args.gan_loss)
        loss_g = l_dist * losses["distill"] + l_dmd * losses["dmd"] + l_adv * losses["adv"]
    b["opt_g"].zero_grad(set_to_none=True)
    loss_g.backward()
    m.disc.requires_grad_(True)
    ok_g = finite(loss_g)
    if ok_g:
        b["opt_g"].step()

    with torch.no_grad():  # the discriminator pass: nothing of the generator pass reused
        z0, cond, _, x_hat, x_T = forward(grad=False)
        with autocast(b):
            f_fake, f_real = features(z0, x_hat, x_T, cond)
    with autocast(b):
        logits_real, logits_fake = b["disc"](torch.cat([f_real, f_fake])).float().chunk(2)
        losses["disc"] = common.gan_d_loss(logits_real, logits_fake, args.gan_loss)
    b["opt_d"].zero_grad(set_to_none=True)
    losses["disc"].backward()
    ok_d = finite(losses["disc"])
    if ok_d:
        b["opt_d"].step()
    return {k: v.detach() for k, v in dict(losses, loss_g=loss_g).items()}, ok_g and ok_d


# ------------------------------------------------------------------------------------------------------
# measuring
# ------------------------------------------------------------------------------------------------------

def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:  # Linux: reset the peak RSS (VmHWM, which getrusage's ru_maxrss reads) to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False  # the peak then covers the whole process so far


def peak_memory_gib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


def flop_rate(flops, sec, peak_tflops):
    out = dict(flops_per_update=flops, tflops_per_s=flops / sec / 1e12)
    return dict(out, mfu=out["tflops_per_s"] / peak_tflops) if peak_tflops else out


def measure(b, label, step_fn, opts, device):
    """Warm-up (and compilation), the timed steps, peak memory, one FLOP-counting step."""
    desc = f"{b['name']} {label}"
    t0 = time.perf_counter()
    for _ in tqdm(range(opts.warmup), desc=f"{desc} warm-up", leave=False, dynamic_ncols=True):
        step_fn()
    synchronize(device)
    out = dict(warmup_s=time.perf_counter() - t0, peak_mem_reset=reset_peak_memory(device))
    times, cpu_times, updated = [], [], 0
    for _ in tqdm(range(opts.steps), desc=f"{desc} timed", leave=False, dynamic_ncols=True):
        synchronize(device)
        t0, c0 = time.perf_counter(), time.process_time()
        losses, ok = step_fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        updated += ok
    sec = sum(times) / len(times)
    # the process's CPU time beside the wall time: on a shared machine the wall time also counts the waits
    out.update(sec_per_update=sec, samples_per_sec=b["args"].batch_size / sec, step_times=times, updated=updated,
               cpu_sec_per_update=sum(cpu_times) / len(cpu_times), peak_mem_gib=peak_memory_gib(device),
               losses={k: float(v) for k, v in losses.items() if v.numel() == 1})
    if opts.flops:
        from torch.utils.flop_counter import FlopCounterMode
        with torch.compiler.set_stance("force_eager"), FlopCounterMode(display=False) as counter:
            step_fn()
        out.update(flop_rate(counter.get_total_flops(), sec, opts.peak_tflops))
    return out


def short_error(e):
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]


def run_backbone(name, opts, device, log, res, save):
    """Our step, then the reference pattern on the same models, into `res`; save() after each."""
    b = build_step(name, opts, device)
    spec, mod, m, args = b["spec"], b["mod"], b["m"], b["args"]
    res.update(script=spec.script + ".py", resolution=args.resolution, batch_size=args.batch_size,
               mixed_precision=args.mixed_precision, compile=args.compile,
               gradient_checkpointing=args.gradient_checkpointing, distill_loss=args.distill_loss, K=b["K"],
               start_index=b["k"], solver_steps=b["K"] - b["k"], phase=opts.phase,
               denoiser_params_m=b["params"] / 1e6, notes=list(spec.notes))

    def ours():
        return optimizer_steps(b, mod.train_step(m, b["student"], b["disc"], b["batch"], b["step"], args))

    res["ours"] = measure(b, "ours", ours, opts, device)
    save()
    if args.compile and opts.eager_too:  # what compiling buys: the same step on the same models, eager
        with torch.compiler.set_stance("force_eager"):
            x = measure(b, "ours eager", ours, argparse.Namespace(**dict(vars(opts), flops=False)), device)
        if "flops_per_update" in res["ours"]:  # the same step's count
            x.update(flop_rate(res["ours"]["flops_per_update"], x["sec_per_update"], opts.peak_tflops))
        res.update(ours_eager=x, compile_speedup=x["sec_per_update"] / res["ours"]["sec_per_update"])
        save()
    if not opts.reference:
        return
    if spec.encode is None:
        res["reference"] = dict(skipped=f"no reference pattern for {name} (flow matching)")
        save()
        return
    try:
        teacher = make_reference_teacher(b)
        if args.compile:  # compiled as ours is, so that the ratio is the pattern's
            mod.compile_blocks(teacher)
        res["reference"] = measure(b, "reference", lambda: reference_step(b, teacher), opts, device)
        res["speedup"] = res["reference"]["sec_per_update"] / res["ours"]["sec_per_update"]
        res["memory_ratio"] = res["reference"]["peak_mem_gib"] / res["ours"]["peak_mem_gib"]
    except Exception as e:  # e.g. out of memory: keep our step's numbers
        res["reference"] = dict(error=short_error(e))
        log.info(f"{name} reference: failed: {res['reference']['error']}")
        traceback.print_exc()
    save()


def flux_memory(batch_size, resolution, opts=None):
    """flash_flux.py's GPU memory at real size, estimated from the released configs on the meta device
    (nothing is allocated): the frozen weights in bf16 (T5-XXL at its full 24 layers), the LoRA in fp32 with
    its gradient, DDP's gradient bucket and AdamW's two moments, and what gradient checkpointing keeps per
    sample and gradient pass (each block's input: image and text tokens at the joint width, bf16). Not
    counted: the recomputed block, the VAE decode and LPIPS, allocator slack. GB: 1e9 bytes."""
    from peft import LoraConfig
    from transformers import T5Config, T5EncoderModel

    import flash_flux
    from models import t5_config
    parts = build_parts("flux", "real", "meta")
    with torch.device("meta"):
        parts["text_encoder_2"] = T5EncoderModel(T5Config(**dict(t5_config("real"), num_layers=24)))
        net = parts["transformer"].requires_grad_(False)
        net.add_adapter(LoraConfig(r=flash_flux.LORA_RANK, lora_alpha=flash_flux.LORA_ALPHA,
                                   target_modules=flash_flux.LORA_TARGETS))
    count = {k: sum(p.numel() for n, p in parts[k].named_parameters() if "lora_" not in n)
             for k in ("transformer", "text_encoder_2", "text_encoder", "vae")}
    lora = sum(p.numel() for p in net.parameters() if p.requires_grad)
    cfg = net.config
    tokens = (resolution // 16) ** 2 + flash_flux.T5_TOKENS
    width = cfg.num_attention_heads * cfg.attention_head_dim
    per_pass = tokens * width * 2 * (cfg.num_layers + cfg.num_single_layers)
    gb = dict(transformer=2 * count["transformer"], t5=2 * count["text_encoder_2"],
              clip_and_vae=2 * (count["text_encoder"] + count["vae"]), lora_states=5 * 4 * lora,
              checkpoints_per_sample_and_pass=per_pass)
    gb = {k: v / 1e9 for k, v in gb.items()}
    fixed = sum(v for k, v in gb.items() if k != "checkpoints_per_sample_and_pass")
    # gradient passes held at once: the student's forward (until the backward), and the GAN's fake pass
    out = dict(gb, params_m={k: v / 1e6 for k, v in dict(count, lora=lora).items()}, fixed=fixed,
               batch_size=batch_size, resolution=resolution,
               total=fixed + 2 * batch_size * gb["checkpoints_per_sample_and_pass"])
    return out


# ------------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------------

def device_info(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as f:
        name = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    return f"{name} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def detect_peak_tflops(device, override):
    """The device's dense bf16 peak, for the MFU (H100 SXM and H200: 989 TFLOP/s, H100 PCIe: 756)."""
    if override or device.type != "cuda":
        return override, "given with --peak_tflops" if override else "CPU: no MFU"
    name = torch.cuda.get_device_name(device).upper()
    peak = 756.0 if "H100" in name and "PCIE" in name else 989.0 if "H100" in name or "H200" in name else None
    return peak, f"{name}: " + ("dense bf16" if peak else "unknown peak, pass --peak_tflops for MFU")


def versions():
    from importlib.metadata import PackageNotFoundError, version
    out = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda)
    for pkg in ("diffusers", "transformers", "peft", "lpips"):
        with contextlib.suppress(PackageNotFoundError):
            out[pkg] = version(pkg)
    return out


def fmt(x, spec=".3g"):
    return "-" if x is None else format(x, spec)


def markdown(report):
    """The report's table, from this version's JSON or an earlier one's (whose by-part breakdowns, kept in
    their markdown, it leaves out)."""
    meta, v = report["meta"], report["meta"]["versions"]
    lines = [f"### Training-step speed: {meta['device_name']}", "",
             f"{meta['date']}; torch {v['torch']}, diffusers {v.get('diffusers')}, transformers "
             f"{v.get('transformers')}, peft {v.get('peft')}; `{meta['command']}`", "",
             "| backbone | size | res | batch | solver steps | precision | step | s / update | samples/s | "
             "peak mem GiB | TFLOP / update | MFU | speed-up | mem ratio |", "|---" * 14 + "|"]
    for r in report["results"]:
        if "ours" not in r:
            lines.append(f"| {r['backbone']} | {r['size']} | | | | | error: {r.get('error')} | | | | | | | |")
            continue
        for variant in ("ours", "ours_eager", "reference"):
            x = r.get(variant)
            if not x:
                continue
            compiled = r["compile"] and variant != "ours_eager"
            prec = r["mixed_precision"] + " +compile" * compiled + " +ckpt" * r["gradient_checkpointing"]
            head = (f"| {r['backbone']} | {r['size']} | {r['resolution']} | {r['batch_size']} | "
                    f"{r['solver_steps']} of {r['K']} | {prec} | {variant.replace('_', ' ')} |")
            if "sec_per_update" not in x:
                lines.append(f"{head} {x.get('skipped') or x.get('error')} | | | | | | |")
                continue
            extra = " | |"
            if variant == "ours" and "speedup" in r:
                extra = f" {r['speedup']:.2f}x | {fmt(r.get('memory_ratio'), '.2f')}x |"
            elif variant == "ours_eager":
                extra = f" compile: {r['compile_speedup']:.2f}x | |"
            sec, flops, mfu = f"{x['sec_per_update']:.4g}", x.get("flops_per_update"), x.get("mfu")
            if meta["device"] == "cpu":
                sec += f" (CPU {x['cpu_sec_per_update']:.3g})"
            lines.append(f"{head} {sec} | {x['samples_per_sec']:.3g} | {x['peak_mem_gib']:.2f} | "
                         f"{fmt(flops and flops / 1e12)} | {fmt(mfu and 100 * mfu, '.1f')}{'%' * bool(mfu)} |{extra}")
    lines += ["", "Notes:"] + [f"- {n}" for n in meta["notes"]]
    for r in report["results"]:
        lines += [f"- {r['backbone']}: {n}" for n in r.get("notes", [])]
        if "error" in r:
            lines.append(f"- {r['backbone']}: error: {r['error']}")
    return "\n".join(lines) + "\n"


def write_report(report, out):
    """The one writer: the markdown at `out` and the JSON beside it, rewritten after each measurement so that
    a run cut short keeps what it measured."""
    text = markdown(report)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(os.path.splitext(out)[0] + ".json", "w") as f:
        json.dump(report, f, indent=1)
    with open(out, "w") as f:
        f.write(text)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--backbone", nargs="+", default=["sd"], choices=BACKBONES + ["all"], help="which scripts; all: every one present")
    a("--size", default="tiny", choices=["tiny", "real"], help="tiny: the tests' configs; real: released architectures")
    a("--resolution", type=int, default=None, help="default: the script's (tiny: 32, the tests')")
    a("--batch_size", type=int, default=None, help="default: the script's per-GPU batch")
    a("--num_teacher_steps", type=int, default=None, help="K; default: the script's")
    a("--start_index", type=int, default=None, help="fixed teacher start index k; default: mean over the phases")
    a("--phase", type=int, default=3, choices=[0, 1, 2, 3], help="phase whose loss weights apply")
    a("--steps", type=int, default=5, help="timed steps")
    a("--warmup", type=int, default=1, help="untimed steps first (at least 1 with --compile)")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--mixed_precision", default=None, choices=["bf16", "no"], help="default: bf16 on CUDA, no on CPU")
    a("--compile", action="store_true", help="the script's --compile: its repeated blocks compiled (both patterns)")
    a("--gradient_checkpointing", action="store_true", help="the scripts' flag")
    a("--distill_loss", default="lpips", choices=["lpips", "l2"], help="lpips: VGG with a random trunk")
    a("--no_reference", dest="reference", action="store_false", help="skip the reference pattern")
    a("--eager_too", action="store_true", help="with --compile: time our step eager too, on the same models")
    a("--no_flops", dest="flops", action="store_false", help="skip the FLOP-counting step")
    a("--peak_tflops", type=float, default=None, help="device peak for MFU; default: detected (H100/H200 989)")
    a("--seed", type=int, default=0)
    a("--out", default=None, help=f"markdown file, the JSON beside it; default {OUT_DIR}/speed_<device>.md")
    a("--table", default=None, metavar="JSON", help="print the markdown of a saved JSON report and exit")
    a("--memory_estimate", action="store_true",
      help="flux: print the GPU memory estimate from the real configs (meta device, nothing run) and exit")
    opts = p.parse_args(argv)
    if opts.steps < 1 or opts.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    if opts.compile and opts.warmup < 1:
        p.error("--compile needs --warmup >= 1 (the first step compiles)")
    if opts.eager_too and not opts.compile:
        p.error("--eager_too compares against a compiled step: add --compile")
    return opts


def main(argv=None):
    opts = parse_args(argv)
    if opts.table:
        with open(opts.table) as f:
            print(markdown(json.load(f)), end="")
        return None
    if opts.memory_estimate:
        est = flux_memory(opts.batch_size or 2, opts.resolution or 1024)
        print(f"flash_flux.py at {est['resolution']} px, batch {est['batch_size']} per GPU, gradient "
              f"checkpointing (GB): frozen transformer {est['transformer']:.1f}, T5-XXL {est['t5']:.1f}, CLIP-L "
              f"and VAE {est['clip_and_vae']:.1f}; LoRA with its gradient, DDP bucket and AdamW moments "
              f"{est['lora_states']:.1f}; block inputs {est['checkpoints_per_sample_and_pass']:.2f} per sample "
              f"and gradient pass (2 passes); total {est['total']:.1f}, before the recomputed block, the VAE "
              "decode, LPIPS and allocator slack")
        return est
    device = torch.device(opts.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    opts.mixed_precision = opts.mixed_precision or ("bf16" if device.type == "cuda" else "no")
    names = opts.backbone
    if "all" in names:
        names = [n for n in BACKBONES if os.path.exists(os.path.join(ROOT, SPECS[n].script + ".py"))]
    opts.peak_tflops, peak_source = detect_peak_tflops(device, opts.peak_tflops)
    out = opts.out or os.path.join(os.path.expanduser(OUT_DIR), f"speed_{device.type}.md")
    logging.basicConfig(format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S", level=logging.INFO)
    log = logging.getLogger("speed")
    notes = ["our step: the script's own train_step; reference: the original code's pattern (fp32 teacher copy, "
             "cond/uncond as two passes, the whole forward again for the D update), same models and losses",
             f"phase {opts.phase} loss weights; fixed teacher start index (solver steps shown)",
             "LPIPS: VGG16 with a random trunk (pnet_rand), the real one's compute" if opts.distill_loss == "lpips"
             else "distillation loss: l2 (no decode)",
             "synthetic data and byte-level tokenizers; random weights",
             "peak memory: " + ("torch.cuda.max_memory_allocated" if device.type == "cuda"
                                else "peak RSS (getrusage), reset before each pattern"),
             f"FLOPs: torch.utils.flop_counter over one eager step; MFU vs {opts.peak_tflops} TFLOP/s ({peak_source})"]
    if device.type == "cpu":
        notes.append("CPU: s / update is wall time, (CPU ...) the process's CPU time per update")
    command = "python bench/speed.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report = dict(meta=dict(date=datetime.datetime.now().isoformat(timespec="seconds"), device=str(device),
                            device_name=device_info(device), versions=versions(), peak_tflops=opts.peak_tflops,
                            peak_source=peak_source, settings=vars(opts), command=command, notes=notes), results=[])
    failed = []
    for name in names:
        res = dict(backbone=name, size=opts.size)
        report["results"].append(res)
        try:
            run_backbone(name, opts, device, log, res, lambda: write_report(report, out))
        except Exception as e:  # one backbone's failure (e.g. out of memory) must not lose the others
            res["error"] = short_error(e)
            log.info(f"{name}: failed: {res['error']}")
            traceback.print_exc()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        write_report(report, out)
        if "error" in res or "error" in res.get("reference", {}):
            failed.append(name)
    print(markdown(report))
    print(f"written: {out} and {os.path.splitext(out)[0]}.json")
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")
    return report


if __name__ == "__main__":
    main()
