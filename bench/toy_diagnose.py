"""Which sampling steps cost the toy student its Frechet distance: chains that mix student steps (S) with
ideal steps (O), and the student against the ideal from noised data and from noised student outputs.

An ideal step at timestep t returns what the student is trained to return there: the teacher's guided
K = 16 DPM-Solver++ solve from x_t (paper section 3, eq. 3's target). Between steps, x0 is re-noised to the
next timestep with fresh noise, as LCMScheduler does. Everything runs on bench/toy.py's 576-image
evaluation set, with its judge.

    python bench/toy_diagnose.py --run ~/.cache/flash_toy/run      # a run bench/toy.py distilled
"""
import argparse
import json
import os
import sys
from types import SimpleNamespace

import torch
from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "bench")]
import common  # noqa: E402
import flash_sd  # noqa: E402
from toy import ASSETS, caption, eval_set, frechet, judge_read, load_judge  # noqa: E402

GRID = [999, 749, 499, 249]  # the training grid: the teacher's ts[k] at k = 0, K/4, K/2, 3K/4 (K = 16)
LCM_GRID = [999, 759, 499, 259]  # LCMScheduler(timestep_spacing="trailing") at 4 steps
K = 16  # the toy's --num_teacher_steps


class Toy:
    """The teacher and the student of one run, with the two kinds of step."""

    def __init__(self, run, guidance):
        from diffusers import DPMSolverMultistepScheduler, LCMScheduler, StableDiffusionPipeline
        self.pipe = StableDiffusionPipeline.from_pretrained(os.path.join(ASSETS, "model"), safety_checker=None,
                                                            requires_safety_checker=False)
        self.pipe.load_lora_weights(run)
        self.pipe.set_progress_bar_config(disable=True)
        cfg = self.pipe.scheduler.config
        self.lcm = LCMScheduler.from_config(cfg, timestep_spacing="trailing")
        self.m = SimpleNamespace(denoiser=self.pipe.unet, teacher_sched=DPMSolverMultistepScheduler.from_config(
            cfg, algorithm_type="dpmsolver++", solver_order=2, timestep_spacing="trailing", final_sigmas_type="zero"))
        self.abar = self.m.teacher_sched.alphas_cumprod.float()
        self.guidance = guidance
        self.uncond = self.text([""])

    def text(self, prompts):
        return flash_sd.encode_text(self.pipe.tokenizer, self.pipe.text_encoder, prompts, torch.device("cpu"))

    @torch.no_grad()
    def student(self, x, t, c):
        """One LCM step's x0: the epsilon prediction turned into x0, with the consistency boundary scalings."""
        tt = torch.full((len(x),), t)
        return common.lcm_x0(x, flash_sd.denoise(self.pipe.unet, x, tt, c), tt, self.abar)

    @torch.no_grad()
    def ideal(self, x, t, c):
        """The student's training target at t: the teacher's guided K-step solve from x_t."""
        self.m.teacher_sched.set_timesteps(K)
        k = self.m.teacher_sched.timesteps.tolist().index(t)
        return flash_sd.teacher_solve(self.m, x, k, c, self.uncond.expand(len(x), -1, -1), self.guidance)

    def chain(self, spec, grid, noise, c, generator):
        """x0 after the steps in `spec` ("S"/"O" per step) on `grid`, from `noise`, re-noised between steps."""
        x = noise
        for i, (who, t) in enumerate(zip(spec, grid)):
            x0 = (self.student if who == "S" else self.ideal)(x, t, c)
            if i < len(spec) - 1:
                x = common.renoise(x0, torch.randn(x0.shape, generator=generator), torch.tensor([grid[i + 1]]), self.abar)
        return x0

    @torch.no_grad()
    def decode(self, z):
        vae = self.pipe.vae
        return (vae.decode(z / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)  # as the pipeline returns

    @torch.no_grad()
    def encode(self, x):
        vae = self.pipe.vae
        return vae.encode(x).latent_dist.sample() * vae.config.scaling_factor


def batches(n, size=128):
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def check_chain_is_the_pipeline(toy, labels, noise):
    """S S S S on LCMScheduler's grid is exactly what StableDiffusionPipeline with the LoRA and LCMScheduler
    returns (same noise, same generator): the chains measure what users sample."""
    prompts = [caption(*lab) for lab in labels[:8]]
    toy.pipe.scheduler = toy.lcm
    ref = toy.pipe(prompts, num_inference_steps=4, guidance_scale=0, latents=noise[:8],
                   generator=torch.Generator().manual_seed(0), output_type="latent").images
    ours = toy.chain("SSSS", LCM_GRID, noise[:8], toy.text(prompts), torch.Generator().manual_seed(0))
    err = float((ours - ref).abs().max())
    if err >= 1e-4:
        raise RuntimeError(f"the S S S S chain differs from the LCM pipeline by {err}: the diagnosis would not "
                           "measure what users sample")
    return err


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="a distilled toy run (its pytorch_lora_weights.safetensors)")
    p.add_argument("--out", default=None, help="folder for diagnosis.md and diagnosis.json (default: beside --run)")
    p.add_argument("--guidance", type=float, default=8.0, help="the ideal step's CFG scale (mean of the training U[3, 13])")
    p.add_argument("--eval_size", type=int, default=576, help="images per row (bench/toy.py's evaluation set)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    out = args.out or os.path.dirname(os.path.abspath(args.run))
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    toy = Toy(args.run, args.guidance)
    judge = load_judge(os.path.join(ASSETS, "judge.pt"))
    labels, noise, real, real_labels = eval_set(args.eval_size)
    _, real_feats = judge_read(judge, real, real_labels)
    n = len(labels)
    conds = [toy.text([caption(*lab) for lab in labels[s]]) for s in batches(n)]
    pipeline_err = check_chain_is_the_pipeline(toy, labels, noise)

    def score(x0s):
        x = torch.cat([toy.decode(z) for z in x0s])
        align, feats = judge_read(judge, x * 2 - 1, labels)
        return x, dict(alignment=align, fd=frechet(feats, real_feats))

    # 1. chains of student (S) and ideal (O) steps
    chains = [("S", GRID), ("SS", [999, 499]), ("SSSS", GRID), ("SSSS", LCM_GRID), ("OOOO", GRID),
              ("SOOO", GRID), ("OSSS", GRID), ("SSOO", GRID), ("SSSO", GRID), ("O", GRID)]
    rows, one_step = [], None
    for spec, grid in tqdm(chains, desc="chains"):
        grid = grid[:len(spec)] if len(spec) > 1 else [999]
        x0s = [toy.chain(spec, grid, noise[s], c, torch.Generator().manual_seed(i))
               for i, (s, c) in enumerate(zip(batches(n), conds))]
        if (spec, grid) == ("S", [999]):
            one_step = torch.cat(x0s)
        _, r = score(x0s)
        rows.append(dict(chain=" ".join(spec), timesteps=grid, **r))

    # 2. the student against the ideal at one timestep, from noised data and from noised 1-step student outputs
    data = torch.cat([toy.encode(real[s]) for s in batches(n)])  # data images with the evaluation labels
    g = torch.Generator().manual_seed(7)
    eps = torch.randn(data.shape, generator=g)
    single = []
    for t in tqdm((749, 499, 249), desc="single steps"):
        for source, z0 in (("data", data), ("1-step student", one_step)):
            x_t = common.renoise(z0, eps, torch.tensor([t]), toy.abar)
            xs, xo = ([f(x_t[s], t, c) for s, c in zip(batches(n), conds)] for f in (toy.student, toy.ideal))
            img_s, r_s = score(xs)
            img_o, r_o = score(xo)
            single.append(dict(t=t, source=source, student_fd=r_s["fd"], ideal_fd=r_o["fd"],
                               student_alignment=r_s["alignment"], ideal_alignment=r_o["alignment"],
                               mse=float(((img_s - img_o) ** 2).mean())))

    lines = [f"Ideal step: the teacher's K = {K} DPM-Solver++ solve with CFG {args.guidance}. {n} images; FD of the "
             "judge's features against two data sets; between steps x0 is re-noised with fresh noise.",
             "", "| chain | timesteps | alignment (%) | Frechet distance |", "|---|---|---|---|"]
    lines += [f"| {r['chain']} | {'/'.join(map(str, r['timesteps']))} | {100 * r['alignment']:.1f} | {r['fd']:.1f} |"
              for r in rows]
    lines += ["", "| t | x_t built from | student FD | ideal FD | student alignment (%) | ideal alignment (%) | "
              "MSE student vs ideal |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['t']} | {r['source']} | {r['student_fd']:.1f} | {r['ideal_fd']:.1f} | "
              f"{100 * r['student_alignment']:.1f} | {100 * r['ideal_alignment']:.1f} | {r['mse']:.4f} |" for r in single]
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(out, "diagnosis.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(out, "diagnosis.json"), "w") as f:
        json.dump(dict(run=args.run, guidance=args.guidance, eval_size=n, chains=rows, single_steps=single,
                       chain_vs_pipeline_max_abs=pipeline_err), f, indent=1)
    print(f"results: {out}/diagnosis.md, diagnosis.json")


if __name__ == "__main__":
    main()
