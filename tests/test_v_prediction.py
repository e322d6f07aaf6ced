"""v-prediction and zero-terminal-SNR models in the epsilon UNet scripts (flash_sd.py here; flash_sdxl.py and
flash_adapter.py share the same formulas from common.py): the prediction type is read from the model's scheduler
config, every x0 is the stock schedulers' own, and at abar = 0 (zero terminal SNR) x0 comes straight from v."""
import os

import numpy as np
import pytest
import torch
from conftest import metrics

import common
import flash_sd


def argv(model, shards, out, *extra):
    return ["--model", model, "--shards", *shards, "--output_dir", str(out), "--resolution", "32",
            "--batch_size", "2", "--phase_steps", "0", "1", "1", "0", "--num_teacher_steps", "4",
            "--mixed_precision", "no", "--num_workers", "1", "--lora_rank", "4", "--lora_alpha", "8",
            "--distill_loss", "l2", "--lr", "3e-3", "--lr_disc", "3e-3", "--log_every", "1",
            "--sample_every", "100", "--checkpoint_every", "1", "--validation_prompts", "a red square", *extra]


def old_lcm_x0(x_t, eps, t, abar):
    """common.lcm_x0 as it was before v prediction: the epsilon path must stay bit for bit the same."""
    a = common.bcast(abar[t], x_t)
    c_skip, c_out = (common.bcast(c, x_t) for c in common.lcm_boundary(t.float()))
    return c_skip * x_t + c_out * (x_t - (1 - a).sqrt() * eps) / a.sqrt()


def old_dmd_loss(x_hat, y, e_real, e_fake, abar_t2):
    a = common.bcast(abar_t2, x_hat)
    coeff = (e_real - e_fake) * (1 - a).sqrt() / a.sqrt()
    return common.dmd_from_x0(x_hat, coeff, (y - (1 - a).sqrt() * e_real) / a.sqrt())


def test_epsilon_path_is_unchanged_and_v_gives_back_x0_and_eps_even_at_abar_zero():
    from diffusers import DDIMScheduler
    abar = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod
    torch.manual_seed(0)
    x, out, t = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8), torch.tensor([999, 749, 30, 1])
    assert torch.equal(common.lcm_x0(x, out, t, abar), old_lcm_x0(x, out, t, abar))
    assert torch.equal(common.lcm_x0(x, out, t, abar, "epsilon"), old_lcm_x0(x, out, t, abar))
    y, e_fake, x_hat = torch.randn_like(x), torch.randn_like(x), torch.randn_like(x)
    assert torch.equal(common.dmd_loss(x_hat, y, out, e_fake, abar[t]), old_dmd_loss(x_hat, y, out, e_fake, abar[t]))
    # v = sqrt(abar) eps - sqrt(1 - abar) x0 of a known x0 and eps, abar = 0 (zero SNR) and 1 included
    x0, eps = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    a = common.bcast(torch.tensor([0.0, 0.3, 0.9, 1.0]), x0)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    got_x0, got_eps = common.x0_and_eps(a.sqrt() * eps - (1 - a).sqrt() * x0, x_t, a, "v_prediction")
    torch.testing.assert_close(got_x0, x0, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_eps, eps, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="'sample'"):
        common.x0_and_eps(out, x, a, "sample")


@pytest.fixture(scope="module")
def v_models(sd_v_model, sd_v_zero_snr_model, shards, tmp_path_factory):
    """build() of both tiny v models, as train_step reads them."""
    out = {}
    for name, model in (("v", sd_v_model), ("zero_snr", sd_v_zero_snr_model)):
        args = flash_sd.parse_args(argv(model, shards, tmp_path_factory.mktemp(name)))
        flash_sd.check_args(args)  # v prediction is accepted now
        out[name] = model, flash_sd.build(args, torch.device("cpu"))
    return out


@pytest.mark.parametrize("name", ["v", "zero_snr"])
def test_student_one_step_is_the_lcm_schedulers_own_v_prediction_output(v_models, name):
    """train_step's x_hat (common.lcm_x0 with m.alphas_cumprod and m.prediction_type) is LCMScheduler.step's
    `denoised` for the same model output, on the model's own config, at each 4-step time."""
    from diffusers import LCMScheduler
    model, m = v_models[name]
    assert m.prediction_type == "v_prediction"  # read from the folder's scheduler config
    lcm = LCMScheduler.from_pretrained(model, subfolder="scheduler", timestep_spacing="trailing")
    lcm.set_timesteps(4)
    assert lcm.timesteps[0] == 999  # then 759, 499, 259 (its 50-step origin grid)
    torch.manual_seed(1)
    x, v = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
    for tau in lcm.timesteps:
        t = tau.expand(2)
        stock = lcm.step(v, tau, x, generator=torch.Generator().manual_seed(0)).denoised
        ours = common.lcm_x0(x, v, t, m.alphas_cumprod, m.prediction_type)
        torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-5)
    abar_999 = float(m.alphas_cumprod[999])
    if name == "zero_snr":  # abar = 0 at t = 999: x0 = -v, never eps / sqrt(abar)
        assert abar_999 == 0.0
        t = torch.tensor([999, 999])
        c_skip, c_out = (common.bcast(c, x) for c in common.lcm_boundary(t.float()))
        ours = common.lcm_x0(x, v, t, m.alphas_cumprod, m.prediction_type)
        assert torch.isfinite(ours).all()
        torch.testing.assert_close(ours, c_skip * x - c_out * v, rtol=0, atol=1e-6)
        assert not torch.isfinite(common.lcm_x0(x, v, t, m.alphas_cumprod, "epsilon")).all()  # the trap
        # DMD at t2 = 999 stays finite and is the x0 form's: x0_fake - x0_real = v_real - v_fake
        x_hat, v_real = torch.randn_like(x), torch.randn_like(x)
        loss = common.dmd_loss(x_hat, x, v_real, v, m.alphas_cumprod[t], m.prediction_type)
        assert torch.isfinite(loss) and loss > 0
        assert torch.equal(loss, common.dmd_from_x0(x_hat, v_real - v, -v_real))
    else:
        assert abar_999 > 0


@pytest.mark.parametrize("name", ["v", "zero_snr"])
def test_teacher_solve_with_v_matches_the_stock_pipeline(v_models, name):
    """The teacher's K-step CFG solve equals StableDiffusionPipeline with its own DPM-Solver++ built from the
    model's scheduler config (so v prediction and the zero-SNR schedule come from there, as in build())."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
    model, m = v_models[name]
    assert m.teacher_sched.config.prediction_type == "v_prediction"
    tok, te, vae, unet = m.tokenizer, m.text_encoder, m.vae, m.denoiser
    prompts = ["a red square", "a blue circle"]
    cond = flash_sd.encode_text(tok, te, prompts, torch.device("cpu"))
    uncond = flash_sd.encode_text(tok, te, [""], torch.device("cpu")).expand(2, -1, -1)
    torch.manual_seed(0)
    x_t = torch.randn(2, 4, 16, 16)
    m.teacher_sched.set_timesteps(4)
    ours = flash_sd.teacher_solve(m, x_t, 0, cond, uncond, 5.0)
    sched = DPMSolverMultistepScheduler.from_pretrained(model, subfolder="scheduler", algorithm_type="dpmsolver++",
                                                        timestep_spacing="trailing", final_sigmas_type="zero")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    with flash_sd.teacher_mode(unet):
        stock = pipe(prompts, num_inference_steps=4, guidance_scale=5.0, latents=x_t, output_type="latent",
                     height=32, width=32).images
    assert torch.isfinite(ours).all() and ours.abs().max() > 0.1
    torch.testing.assert_close(ours, stock.float(), rtol=1e-4, atol=1e-4)
    # the epsilon reading of the same outputs would land elsewhere: the test can tell them apart
    eps_sched = DPMSolverMultistepScheduler.from_config(sched.config, prediction_type="epsilon")
    pipe.scheduler = eps_sched
    with flash_sd.teacher_mode(unet):
        wrong = pipe(prompts, num_inference_steps=4, guidance_scale=5.0, latents=x_t, output_type="latent",
                     height=32, width=32).images
    assert (wrong.float() - ours).abs().max() > 1e-2


def test_a_zero_snr_v_model_trains_resumes_and_its_lora_samples_in_the_stock_pipeline(sd_v_zero_snr_model, shards,
                                                                                        tmp_path):
    """Two updates with every loss on (one, then a resume for the second; the grid on the way), then the exported
    LoRA in StableDiffusionPipeline with the model's own LCMScheduler: finite images, the trained student."""
    from diffusers import LCMScheduler, StableDiffusionPipeline
    out = tmp_path / "run"
    _, step = flash_sd.main(argv(sd_v_zero_snr_model, shards, out, "--max_steps", "1", "--backward_sim", "1"))
    assert step == 1
    m, step = flash_sd.main(argv(sd_v_zero_snr_model, shards, out, "--resume", "latest", "--sample_every", "2"))
    rows = metrics(out)
    assert step == 2 and [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["nonfinite"] == 0 and all(np.isfinite(r[k]) and r[k] > 0 for k in ("distill", "dmd", "adv", "disc"))
    assert "resumed from" in open(out / "log.txt").read() and (out / "samples" / "step_000002.png").exists()
    pipe = StableDiffusionPipeline.from_pretrained(sd_v_zero_snr_model, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(out))
    images = pipe(["a red square"], num_inference_steps=4, guidance_scale=0, height=32, width=32,
                  generator=torch.Generator().manual_seed(0), output_type="np").images
    assert np.isfinite(images).all() and images.std() > 0.01
    torch.manual_seed(0)
    x, t, c = torch.randn(1, 4, 16, 16), torch.tensor([999]), torch.randn(1, 77, 32)
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, t, encoder_hidden_states=c).sample,
                                   m.denoiser(x, t, encoder_hidden_states=c).sample, rtol=1e-5, atol=1e-5)
    assert os.path.isfile(out / "checkpoints" / "step_000002" / "training_state.pt")
