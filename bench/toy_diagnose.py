"""Which sampling steps cost the toy student its Frechet distance: chains that mix student steps (S) with
ideal steps (O), and the student against the ideal from noised data and from noised student outputs;
how far apart the ideal steps at different guidance scales are (the student is not told w); and which
loss term steers the LoRA in the later phases (the gradient of each term at the run's checkpoints);
whether the judge's FD favours less guided images (the teacher at fixed w); and how the student improves over
the run (its table rows at each checkpoint, with the attribute its 1-step images get wrong).

An ideal step at timestep t returns what the student is trained to return there: the teacher's guided
K = 16 DPM-Solver++ solve from x_t (paper section 3, eq. 3's target). Between steps, x0 is re-noised to the
next timestep with fresh noise, as LCMScheduler does. Everything runs on bench/toy.py's 576-image
evaluation set, with its judge.

    python bench/toy_diagnose.py --run ~/.cache/flash_toy/run      # a run bench/toy.py distilled
    python bench/toy_diagnose.py --run ~/.cache/flash_toy/run --parts w_spread,w_fd,grads,checkpoints  # the cheap parts
"""
import argparse
import glob
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
from toy import ASSETS, caption, eval_set, frechet, generate, generate_drawn_w, judge_read, load_judge  # noqa: E402

GRID = [999, 749, 499, 249]  # the training grid: the teacher's ts[k] at k = 0, K/4, K/2, 3K/4 (K = 16)
LCM_GRID = [999, 759, 499, 259]  # LCMScheduler(timestep_spacing="trailing") at 4 steps
K = 16  # the toy's --num_teacher_steps
W_FD = (1.0, 3.0, 5.0, 8.0, 13.0)  # the w_fd part's guidance scales (1: no guidance)
PARTS = ("chains", "w_spread", "w_fd", "grads", "checkpoints")


class Toy:
    """The teacher and the student of one run, with the two kinds of step."""

    def __init__(self, run, guidance):
        self.run = run
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
    def ideal(self, x, t, c, guidance=None):
        """The student's training target at t: the teacher's guided K-step solve from x_t."""
        self.m.teacher_sched.set_timesteps(K)
        k = self.m.teacher_sched.timesteps.tolist().index(t)
        w = self.guidance if guidance is None else guidance
        return flash_sd.teacher_solve(self.m, x, k, c, self.uncond.expand(len(x), -1, -1), w)

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


def w_spread(toy, sources, conds, ws):
    """The student is trained towards the ideal step at a w it is not told (U[3, 13] per batch), so at
    best it returns the mean of the ideal steps over w. Per t and source: the student's MSE to the ideal
    at each w and to their mean, and the ideal steps' own spread about that mean (the part of the error
    no student without w can remove). Latent MSE, per element."""
    rows = []
    for t in (999, 749, 499, 249):
        for source, x_t in sources(t):
            parts = batches(len(x_t))
            student = torch.cat([toy.student(x_t[s], t, c) for s, c in zip(parts, conds)])
            ideal = {w: torch.cat([toy.ideal(x_t[s], t, c, w) for s, c in zip(parts, conds)]) for w in ws}
            mean = torch.stack(list(ideal.values())).mean(0)
            mse = lambda a, b: float(((a - b) ** 2).mean())  # noqa: E731
            rows.append(dict(t=t, source=source, student_to_ideal={f"{w:g}": mse(student, ideal[w]) for w in ws},
                             student_to_mean=mse(student, mean),
                             ideal_spread=sum(mse(ideal[w], mean) for w in ws) / len(ws),
                             ideal_first_to_last=mse(ideal[ws[0]], ideal[ws[-1]])))
            if t == 999:
                break  # pure noise: the same from every source
    return rows


def term_gradients(run, n_batches, seed=0):
    """The gradient of each weighted generator loss term (distillation, DMD, GAN) on the LoRA, at each
    checkpoint of the run, through flash_sd.train_step with the other two terms' weights set to zero:
    the same k, x_t, w and noise for the three (one seed per batch). Its norm says how hard each term
    pulls, the cosine between two terms whether they pull together. Measured in the phase that follows
    the checkpoint, split into batches starting from noise (k = 0) and from noised data (k > 0)."""
    from peft.utils import set_peft_model_state_dict
    folders = sorted(glob.glob(os.path.join(run, "checkpoints", "step_*")))
    if not folders:
        raise SystemExit(f"toy_diagnose.py: no checkpoints beside {run}: the grads part needs the run's "
                         "checkpoints/step_* folders")
    rows, m = [], None
    for folder in folders:
        state = torch.load(os.path.join(folder, "training_state.pt"), map_location="cpu", weights_only=True)
        # flash_sd.py's defaults under the saved config: a run from before a flag existed ran without it
        args = SimpleNamespace(**dict(vars(flash_sd.parse_args(["--shards", "unused"])), **state["config"]))
        if m is None:
            m = flash_sd.build(args, torch.device("cpu"))
            loader = iter(common.make_loader(args.shards, args.resolution, args.batch_size, num_workers=0,
                                             min_aesthetic=args.min_aesthetic, seed=seed + 1,
                                             aesthetic_key=args.aesthetic_key))
            data = [next(loader) for _ in range(n_batches)]
        set_peft_model_state_dict(m.denoiser, state["lora"])
        m.disc.load_state_dict(state["disc"])
        params = [p for p in m.denoiser.parameters() if p.requires_grad]
        step = state["step"]
        phase = common.phase_of(step, args.phase_steps)
        weights = dict(distill=args.distill_weights[phase], dmd=args.dmd_weights[phase], adv=args.adv_weights[phase])
        per_batch = []
        for b, batch in enumerate(tqdm(data, desc=f"gradients at step {step}")):
            grads = {}
            for term in weights:
                only = {f"{n}_weights": [weights[n] if n == term else 0.0] * 4 for n in weights}
                torch.manual_seed(seed + b)
                for p in params:
                    p.grad = None
                out = flash_sd.train_step(m, m.denoiser, m.disc, batch, step, SimpleNamespace(**dict(vars(args), **only)))
                grads[term] = torch.cat([p.grad.flatten() for p in params]) if weights[term] > 0 else None
            k = int((torch.tensor(m.teacher_sched.timesteps.tolist()) == out["t"]).nonzero()[0])
            per_batch.append(dict(k=k, **{f"norm_{n}": float(g.norm()) if g is not None else 0.0
                                          for n, g in grads.items()},
                                  **{f"cos_distill_{n}": float(torch.nn.functional.cosine_similarity(
                                      grads["distill"], grads[n], dim=0)) if grads[n] is not None else None
                                     for n in ("dmd", "adv")}))
        for group, pick in (("k = 0", lambda r: r["k"] == 0), ("k > 0", lambda r: r["k"] > 0)):
            sel = [r for r in per_batch if pick(r)]
            if sel:
                mean = {key: (sum(r[key] for r in sel) / len(sel) if sel[0][key] is not None else None)
                        for key in sel[0] if key != "k"}
                rows.append(dict(step=step, phase=phase, weights=weights, batches=group, n=len(sel), **mean))
    return rows


def checkpoint_rows(run, judge, labels, noise, real_feats):
    """The student at 4, 2 and 1 steps from each kept checkpoint, as bench/toy.py's table scores it (a stock
    pipeline, load_lora_weights, LCMScheduler), with the share of images whose shape, colour or background the
    judge reads wrong (alignment counts an image only when all three read right)."""
    from diffusers import LCMScheduler, StableDiffusionPipeline
    folders = sorted(glob.glob(os.path.join(run, "checkpoints", "step_*")))
    if not folders:
        raise SystemExit(f"toy_diagnose.py: no checkpoints beside {run}: the checkpoints part needs the run's "
                         "checkpoints/step_* folders")
    pipe = StableDiffusionPipeline.from_pretrained(os.path.join(ASSETS, "model"), safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    rows = []
    for folder in tqdm(folders, desc="checkpoints"):
        pipe.load_lora_weights(folder, adapter_name="student")
        for steps in (4, 2, 1):
            x = generate(pipe, labels, noise, steps, 0.0) * 2 - 1
            align, feats = judge_read(judge, x, labels)
            with torch.no_grad():
                read = torch.stack([logits.argmax(1) for logits in judge(x)[1]], 1).numpy()
            wrong = (read != labels).mean(0)
            rows.append(dict(step=int(folder.rsplit("_", 1)[1]), steps=steps, alignment=align,
                             fd=frechet(feats, real_feats), wrong_shape=float(wrong[0]),
                             wrong_colour=float(wrong[1]), wrong_background=float(wrong[2])))
        pipe.delete_adapters("student")
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="a distilled toy run (its pytorch_lora_weights.safetensors)")
    p.add_argument("--out", default=None, help="folder for diagnosis.md and diagnosis.json (default: beside --run)")
    p.add_argument("--guidance", type=float, default=8.0, help="the ideal step's CFG scale (mean of the training U[3, 13])")
    p.add_argument("--eval_size", type=int, default=576, help="images per row (bench/toy.py's evaluation set)")
    p.add_argument("--parts", default=",".join(PARTS),
                   help="comma-separated: chains (student and ideal steps mixed, and single steps), w_spread "
                        "(ideal steps at w = 3 ... 13 against the student), w_fd (the teacher's FD at fixed w), "
                        "grads (each loss term's gradient), checkpoints (the student's rows at each checkpoint)")
    p.add_argument("--ws", type=float, nargs="+", default=[3.0, 5.5, 8.0, 10.5, 13.0],
                   help="the w_spread part's guidance scales (default: U[3, 13] in five)")
    p.add_argument("--grad_batches", type=int, default=16, help="training batches per checkpoint for grads")
    args = p.parse_args(argv)
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown:
        p.error(f"--parts: unknown {sorted(unknown)}; choose from {','.join(PARTS)}")
    return args


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

    parts = args.parts.split(",")
    data = torch.cat([toy.encode(real[s]) for s in batches(n)])  # data images with the evaluation labels
    eps = torch.randn(data.shape, generator=torch.Generator().manual_seed(7))
    one_step = torch.cat([toy.student(noise[s], 999, c) for s, c in zip(batches(n), conds)])
    result = dict(run=args.run, guidance=args.guidance, eval_size=n, chain_vs_pipeline_max_abs=pipeline_err)
    lines = [f"{n} images; ideal step: the teacher's K = {K} DPM-Solver++ solve with CFG {args.guidance} (unless "
             "a w is given); FD of the judge's features against two data sets; between steps x0 is re-noised "
             "with fresh noise.", ""]

    if "chains" in parts:  # 1. chains of student (S) and ideal (O) steps
        chains = [("S", GRID), ("SS", [999, 499]), ("SSSS", GRID), ("SSSS", LCM_GRID), ("OOOO", GRID),
                  ("SOOO", GRID), ("OSSS", GRID), ("SSOO", GRID), ("SSSO", GRID), ("O", GRID)]
        rows = []
        for spec, grid in tqdm(chains, desc="chains"):
            grid = grid[:len(spec)] if len(spec) > 1 else [999]
            x0s = [toy.chain(spec, grid, noise[s], c, torch.Generator().manual_seed(i))
                   for i, (s, c) in enumerate(zip(batches(n), conds))]
            _, r = score(x0s)
            rows.append(dict(chain=" ".join(spec), timesteps=grid, **r))

        # 2. the student against the ideal at one timestep, from noised data and from noised 1-step outputs
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
        result.update(chains=rows, single_steps=single)
        lines += ["| chain | timesteps | alignment (%) | Frechet distance |", "|---|---|---|---|"]
        lines += [f"| {r['chain']} | {'/'.join(map(str, r['timesteps']))} | {100 * r['alignment']:.1f} | "
                  f"{r['fd']:.1f} |" for r in rows]
        lines += ["", "| t | x_t built from | student FD | ideal FD | student alignment (%) | ideal alignment (%) | "
                  "MSE student vs ideal |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['t']} | {r['source']} | {r['student_fd']:.1f} | {r['ideal_fd']:.1f} | "
                  f"{100 * r['student_alignment']:.1f} | {100 * r['ideal_alignment']:.1f} | {r['mse']:.4f} |"
                  for r in single]
        lines.append("")

    if "w_spread" in parts:  # 3. the ideal steps at several w, against the student
        def sources(t):
            if t == 999:
                return [("noise", noise)]
            return [(src, common.renoise(z0, eps, torch.tensor([t]), toy.abar))
                    for src, z0 in (("data", data), ("1-step student", one_step))]
        spread = w_spread(toy, sources, conds, args.ws)
        result.update(w_spread=spread)
        ws = list(spread[0]["student_to_ideal"])
        lines += ["Latent MSE of one student step against the ideal step at each w, and against their mean; the "
                  "ideal steps' spread about their mean (mean over w of the MSE); ideal at the first w against the "
                  "last.", "",
                  "| t | x_t built from | " + " | ".join(f"student to ideal, w = {w}" for w in ws)
                  + f" | student to the mean | spread of the ideal steps | ideal {ws[0]} to {ws[-1]} |",
                  "|---|---|" + "---|" * (len(ws) + 3)]
        lines += [f"| {r['t']} | {r['source']} | " + " | ".join(f"{v:.4f}" for v in r["student_to_ideal"].values())
                  + f" | {r['student_to_mean']:.4f} | {r['ideal_spread']:.4f} | {r['ideal_first_to_last']:.4f} |"
                  for r in spread]
        lines.append("")

    if "w_fd" in parts:  # 4. does the judge's FD favour less guided images? the teacher at fixed w
        w_fd = []
        for w in tqdm(W_FD, desc="teacher at fixed w"):
            with flash_sd.teacher_mode(toy.pipe.unet):
                x = generate_drawn_w(toy.pipe, labels, noise, 32, (w, w))
            align, feats = judge_read(judge, x * 2 - 1, labels)
            w_fd.append(dict(w=w, steps=32, alignment=align, fd=frechet(feats, real_feats)))
        result.update(w_fd=w_fd)
        lines += ["The teacher (LoRA off) at 32 DPM-Solver++ steps and a fixed w, on the same prompts and noise:", "",
                  "| w | alignment (%) | Frechet distance |", "|---|---|---|"]
        lines += [f"| {r['w']:g} | {100 * r['alignment']:.1f} | {r['fd']:.1f} |" for r in w_fd]
        lines.append("")

    if "grads" in parts:  # 5. which loss term pulls the LoRA, at each checkpoint
        grads = term_gradients(args.run, args.grad_batches)
        result.update(grads=grads)
        lines += ["Gradient norm of each weighted loss term on the LoRA (lambda x |grad|), mean over batches, and the "
                  "cosine between the distillation term's gradient and the others'.", "",
                  "| checkpoint | phase | weights dist / dmd / adv | batches | n | distill | DMD | GAN | "
                  "cos(distill, DMD) | cos(distill, GAN) |", "|---|---|---|---|---|---|---|---|---|---|"]
        fmt = lambda v: "" if v is None else f"{v:.3g}"  # noqa: E731
        lines += [f"| {r['step']} | {r['phase']} | {r['weights']['distill']:g} / {r['weights']['dmd']:g} / "
                  f"{r['weights']['adv']:g} | {r['batches']} | {r['n']} | {fmt(r['norm_distill'])} | "
                  f"{fmt(r['norm_dmd'])} | {fmt(r['norm_adv'])} | {fmt(r['cos_distill_dmd'])} | "
                  f"{fmt(r['cos_distill_adv'])} |" for r in grads]
        lines.append("")

    if "checkpoints" in parts:  # 6. the student's table rows over the run
        ckpts = checkpoint_rows(args.run, judge, labels, noise, real_feats)
        result.update(checkpoints=ckpts)
        lines += ["The student at each kept checkpoint, as the table scores it; the share of its images whose "
                  "shape, colour or background the judge reads wrong.", "",
                  "| checkpoint | steps | alignment (%) | Frechet distance | wrong shape (%) | wrong colour (%) | "
                  "wrong background (%) |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['step']} | {r['steps']} | {100 * r['alignment']:.1f} | {r['fd']:.1f} | "
                  f"{100 * r['wrong_shape']:.1f} | {100 * r['wrong_colour']:.1f} | {100 * r['wrong_background']:.1f} |"
                  for r in ckpts]
        lines.append("")

    table = "\n".join(lines)
    print(table)
    with open(os.path.join(out, "diagnosis.md"), "w") as f:
        f.write(table)
    with open(os.path.join(out, "diagnosis.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"results: {out}/diagnosis.md, diagnosis.json")


if __name__ == "__main__":
    main()
