"""flash_sd3.py on a tiny SD3 layout (MMDiT with 16 latent channels, two CLIPs with projections, T5, a VAE with a
shift factor): the flow-matching forms against hand-computed values and stock diffusers, the conditioning with and
without T5, the student's sampler, and the LoRA a run writes in a stock StableDiffusion3Pipeline."""
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
from conftest import load_state, metrics
from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchLCMScheduler, StableDiffusion3Pipeline

import common
import flash_sd3

CPU = torch.device("cpu")


def argv(model, shards, out, *extra):
    return ["--model", model, "--shards", *shards, "--output_dir", str(out), "--resolution", "32",
            "--batch_size", "2", "--phase_steps", "1", "1", "1", "1", "--num_teacher_steps", "4",
            "--mixed_precision", "no", "--num_workers", "1", "--lora_rank", "4", "--lora_alpha", "8",
            "--distill_loss", "l2", "--log_every", "1", "--sample_every", "100", "--checkpoint_every", "100",
            "--validation_prompts", "a red square", "a blue circle", *extra]


@pytest.fixture(scope="module")
def loaded(sd3_model, shards, tmp_path_factory):
    args = flash_sd3.parse_args(argv(sd3_model, shards, tmp_path_factory.mktemp("o"), "--use_t5"))
    return flash_sd3.build(args, CPU)


@pytest.fixture(scope="module")
def stock(sd3_model):
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_defaults_are_the_sd3_column():
    a = flash_sd3.parse_args(["--shards", "x.tar"])
    assert (a.model, a.resolution, a.batch_size) == ("stabilityai/stable-diffusion-3-medium-diffusers", 1024, 2)
    assert (a.num_teacher_steps, a.guidance_min, a.guidance_max, a.lora_rank, a.lora_alpha) == (32, 7, 13, 64, 8)
    assert a.adv_weights == [0, .1, .3, .5] and a.dmd_weights == [0, .3, .5, .7] and a.phase_steps == [2500] * 4
    assert not a.use_t5 and a.negative_prompt.startswith("deformed, distorted") and a.negative_prompt.endswith("NSFW")
    assert flash_sd3.parse_args(["--shards", "x.tar", "--negative_prompt", ""]).negative_prompt == ""


def test_published_trainable_parameter_count():
    """SD3-medium (2,028.3M) with the rank-64 LoRA on PixArt's target list + the SD3 head = 90.4M, the paper's
    published size."""
    from diffusers import SD3Transformer2DModel
    from peft import LoraConfig
    with torch.device("meta"):
        net = SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                                    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                                    pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)
        assert abs(sum(p.numel() for p in net.parameters()) / 1e6 - 2028.3) < 0.1
        net.requires_grad_(False).add_adapter(LoraConfig(r=64, lora_alpha=8, target_modules=flash_sd3.LORA_TARGETS))
    hit = {re.sub(r"transformer_blocks\.\d+", "B", n) for n, mod in net.named_modules() if hasattr(mod, "lora_A")}
    assert {"pos_embed.proj", "proj_out", "norm_out.linear", "B.attn.to_q", "B.ff_context.net.0.proj"} <= hit
    assert not any("add_q_proj" in n or "context_embedder" in n for n in hit)
    lora = sum(p.numel() for p in net.parameters() if p.requires_grad)
    head = flash_sd3.make_discriminator(16, 128)
    assert head(torch.randn(1, 16, 128, 128)).shape == (1, 25)  # 128x128 velocity map at 1024 px -> 5x5 logits
    assert abs((lora + sum(p.numel() for p in head.parameters())) / 1e6 - 90.4) < 0.05


def test_vae_shift_and_scale_both_ways(loaded, stock):
    vae = loaded.vae
    assert (vae.config.shift_factor, vae.config.scaling_factor) == (0.0609, 1.5035)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.manual_seed(0)
        z = flash_sd3.to_latent(vae, x)
        torch.manual_seed(0)
        raw = vae.encode(x).latent_dist.sample()
        torch.testing.assert_close(z, (raw - 0.0609) * 1.5035)
        torch.testing.assert_close(z.mean(), (raw.mean() - 0.0609) * 1.5035)  # the latent mean moves by the shift
        torch.testing.assert_close(flash_sd3.from_latent(vae, z), vae.decode(raw).sample)  # decode undoes both
        # the stock pipeline decodes its latents the same way
        run = dict(prompt="a red square", num_inference_steps=2, height=32, width=32)
        latents = stock(**run, generator=torch.Generator().manual_seed(0), output_type="latent").images
        image = stock(**run, generator=torch.Generator().manual_seed(0), output_type="pt").images
        ours = (flash_sd3.from_latent(vae, latents) / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(ours, image, rtol=1e-5, atol=1e-5)


def test_conditioning_with_and_without_t5_matches_the_stock_pipeline(loaded, stock):
    tokenizers, encoders = loaded.tokenizers, loaded.text_encoders
    prompts = ["a red square", "a blue circle"]
    neg = [flash_sd3.NEGATIVE_PROMPT] * 2
    with torch.no_grad():
        ours_t5 = flash_sd3.encode_text(tokenizers, encoders, prompts, 64, CPU)
        ref_t5 = stock.encode_prompt(prompts, None, None, negative_prompt=neg)
        ours_off = flash_sd3.encode_text(tokenizers[:2], encoders[:2], prompts, 64, CPU)
        uncond_off = flash_sd3.encode_text(tokenizers[:2], encoders[:2], neg[:1], 64, CPU)
        t5, stock.text_encoder_3 = stock.text_encoder_3, None  # the stock pipeline without T5
        try:
            ref_off = stock.encode_prompt(prompts, None, None, negative_prompt=neg)
        finally:
            stock.text_encoder_3 = t5
    for ours, (text, neg_text, pooled, neg_pooled) in ((ours_t5, ref_t5), (ours_off, ref_off)):
        assert ours["text"].shape == (2, 77 + 256, 64) and ours["pooled"].shape == (2, 48)
        torch.testing.assert_close(ours["text"], text)
        torch.testing.assert_close(ours["pooled"], pooled)
    torch.testing.assert_close(uncond_off["text"], ref_off[1][:1])  # the negative prompt is the unconditional input
    torch.testing.assert_close(uncond_off["pooled"], ref_off[3][:1])
    torch.testing.assert_close(loaded.uncond["text"], ref_t5[1][:1])  # build's: the negative prompt, through T5
    torch.testing.assert_close(loaded.uncond["pooled"], ref_t5[3][:1])
    assert ours_off["text"][:, 77:].abs().max() == 0 and ours_t5["text"][:, 77:].abs().max() > 0.1
    assert ours_off["text"][:, :77, 48:].abs().max() == 0  # CLIP widths 16 + 32, zero-padded to the joint 64


def test_flow_forms_by_hand():
    """x_t, the student's x0 = x_t - sigma v, and the flow DMD loss's gradient, against hand-computed values."""
    z0, eps = torch.tensor([[0.5, -1.0]]).view(1, 2, 1, 1).repeat(2, 1, 1, 1), torch.ones(2, 2, 1, 1)
    sigma = torch.tensor([1.0, 0.25])
    x_t = common.renoise_flow(z0, eps, sigma)
    assert x_t.flatten().tolist() == [1.0, 1.0, 0.25 + 0.375, 0.25 - 0.75]  # pure noise at sigma = 1
    v = torch.tensor([2.0, 4.0, -1.0, 8.0]).view(2, 2, 1, 1)
    assert flash_sd3.x0_from_v(x_t, v, sigma).flatten().tolist() == [1 - 2.0, 1 - 4.0, 0.625 + 0.25, -0.5 - 2.0]
    torch.testing.assert_close(flash_sd3.x0_from_v(x_t, eps - z0, sigma), z0)  # the true velocity gives z0 back

    torch.manual_seed(0)
    x_hat = torch.randn(2, 3, 4, 4, requires_grad=True)
    s2 = torch.tensor([0.3, 0.9])
    y = common.renoise_flow(x_hat.detach(), torch.randn(2, 3, 4, 4), s2)
    v_real, v_fake = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    common.dmd_loss_flow(x_hat, y, v_real, v_fake, s2).backward()
    s = s2.view(2, 1, 1, 1)
    x0_real = y - s * v_real
    wgt = 1 / ((x_hat.detach() - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True) + 1e-5)
    torch.testing.assert_close(x_hat.grad, 2 / x_hat.numel() * wgt * s * (v_real - v_fake))  # x0_fake - x0_real
    x_hat.grad = None
    common.dmd_loss_flow(x_hat, y, v_real, v_real.clone(), s2).backward()
    assert x_hat.grad.abs().max() == 0


def test_teacher_euler_solve_by_hand_and_against_the_stock_pipeline(loaded, stock):
    m = loaded
    tokenizers, encoders, net = m.tokenizers, m.text_encoders, m.denoiser
    # build's teacher grid, K = 4, shift 3: u = linspace(1, 0.002994, 4), sigma = 3u / (1 + 2u), then the final 0
    u = torch.linspace(1, 0.003 / 1.002, 4, dtype=torch.float64)
    torch.testing.assert_close(m.sigmas, torch.cat([3 * u / (1 + 2 * u), torch.zeros(1, dtype=u.dtype)]).float())
    prompts = ["a red square", "a blue circle"]
    cond = flash_sd3.encode_text(tokenizers[:2], encoders[:2], prompts, 64, CPU)
    uncond = flash_sd3.expand_cond(flash_sd3.encode_text(tokenizers[:2], encoders[:2], ["ugly"], 64, CPU), 2)
    torch.manual_seed(0)
    x_t = torch.randn(2, 16, 16, 16)
    with torch.no_grad():
        ours = flash_sd3.teacher_solve(m, x_t, 2, cond, uncond, 7.5)
        x = x_t
        with flash_sd3.teacher_mode(net):
            for i in (2, 3):  # two Euler steps, the CFG halves as two separate forwards
                s = m.sigmas[i].expand(2)
                v_u, v_c = flash_sd3.denoise(net, x, s, uncond), flash_sd3.denoise(net, x, s, cond)
                x = x + (m.sigmas[i + 1] - m.sigmas[i]) * (v_u + 7.5 * (v_c - v_u))
        torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)
        full = flash_sd3.teacher_solve(m, x_t, 0, cond, uncond, 7.5)
        stock.text_encoder_3, t5 = None, stock.text_encoder_3
        try:
            ref = stock(prompts, negative_prompt=["ugly"] * 2, num_inference_steps=4, guidance_scale=7.5, latents=x_t,
                        height=32, width=32, output_type="latent").images
        finally:
            stock.text_encoder_3 = t5
    torch.testing.assert_close(full, ref, rtol=1e-4, atol=1e-4)


def test_student_sampler_is_flow_match_lcm_at_the_mixture_modes():
    # the real SD3 scheduler (shift 3), K = 32: the student's 4 sigmas are the mixture's modes 0, 8, 16, 24
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(32)
    four = flash_sd3.student_sigmas(sched.sigmas, 4)
    np.testing.assert_allclose(four, [1.0, 0.8965, 0.7389, 0.4700], atol=1e-4)
    assert flash_sd3.student_sigmas(sched.sigmas, 2) == [four[0], four[2]]
    assert flash_sd3.student_sigmas(sched.sigmas, 1) == [1.0]
    sched.set_timesteps(34)  # K not a multiple of 4: still the modes, indices 0, 8, 16, 24
    modes = common.start_index_probs(34, common.MODE_PROBS[-1]).argsort()[-4:].sort().values.tolist()
    assert modes == [0, 8, 16, 24]
    assert flash_sd3.student_sigmas(sched.sigmas, 4) == [float(sched.sigmas[i]) for i in modes]
    for pi in common.MODE_PROBS:  # the modes with weight are where the mixture peaks; nothing lands near 10 or 21
        p = common.start_index_probs(32, pi)
        assert all(p[j] > 0.05 for j, w in zip((0, 8, 16, 24), pi) if w > 0) and p[[10, 11, 20, 21, 31]].max() < 1e-3
    stock_lcm = FlowMatchLCMScheduler(shift=3.0)
    stock_lcm.set_timesteps(4)  # the stock spacing the released model used
    np.testing.assert_allclose(stock_lcm.sigmas[:4], [1.0, 0.8577, 0.6022, 0.0089], atol=1e-4)

    # FlowMatchLCMScheduler (shift 1: the sigmas are given shifted) against the reference step
    lcm = FlowMatchLCMScheduler.from_config(sched.config, shift=1.0)
    lcm.set_timesteps(sigmas=four)
    torch.testing.assert_close(lcm.sigmas, torch.tensor(four + [0.0]))
    torch.testing.assert_close(lcm.timesteps, 1000 * torch.tensor(four))
    torch.manual_seed(0)
    x = torch.randn(2, 16, 8, 8)
    for i, t in enumerate(lcm.timesteps):
        v = torch.randn_like(x)
        out = lcm.step(v, t, x, generator=torch.Generator().manual_seed(i)).prev_sample
        s, s_next = four[i], (four + [0.0])[i + 1]
        x0 = x - s * v  # x0 = x - sigma v, then fresh noise up to the next sigma
        ref = (1 - s_next) * x0 + s_next * torch.randn(x.shape, generator=torch.Generator().manual_seed(i))
        torch.testing.assert_close(out, ref)
        x = out
    torch.testing.assert_close(x, x0)  # the last step returns the clean estimate


def test_bad_layout_and_resolution_are_named(sd_model, sd3_model, shards, tmp_path):
    with pytest.raises(common.UsageError, match="cannot read a diffusers SD3 layout"):
        flash_sd3.check_args(flash_sd3.parse_args(argv(sd_model, shards, tmp_path / "a")))
    with pytest.raises(common.UsageError, match="multiple of 4"):
        flash_sd3.check_args(flash_sd3.parse_args(argv(sd3_model, shards, tmp_path / "b", "--resolution", "34")))
    with pytest.raises(common.UsageError, match="at most 64"):
        flash_sd3.check_args(flash_sd3.parse_args(argv(sd3_model, shards, tmp_path / "c", "--resolution", "128")))
    no_t5 = tmp_path / "no-t5"
    shutil.copytree(sd3_model, no_t5, ignore=shutil.ignore_patterns("text_encoder_3"))
    with pytest.raises(common.UsageError, match="--use_t5"):
        flash_sd3.check_args(flash_sd3.parse_args(argv(str(no_t5), shards, tmp_path / "d", "--use_t5")))
    flash_sd3.check_args(flash_sd3.parse_args(argv(str(no_t5), shards, tmp_path / "e")))  # T5 off needs no T5


@pytest.fixture(scope="module")
def e2e(sd3_model, shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "run"
    m, step = flash_sd3.main(argv(sd3_model, shards, out, "--lr", "3e-3", "--checkpoint_every", "2",
                                  "--keep_checkpoints", "1", "--sample_every", "4"))
    assert step == 4
    return out, m


def test_end_to_end_run(e2e):
    from PIL import Image
    out, m = e2e
    rows = metrics(out)
    assert [r["phase"] for r in rows] == [0, 1, 2, 3]
    assert rows[0]["dmd"] == 0 and rows[0]["adv"] == 0 and rows[0]["distill"] > 0 and rows[0]["disc"] > 0
    assert all(r["dmd"] > 0 and r["adv"] > 0 for r in rows[1:])
    assert {round(r["t"], 1) for r in rows} <= {1000.0, 857.7, 602.2, 8.9}  # starts on the K = 4 grid
    # the DMD and GAN levels come from the 1000-step training grid (shift 3), not from the K-step teacher grid
    assert len(m.train_sigmas) == 1000
    torch.testing.assert_close(m.train_sigmas[flash_sd3.GAN_INDICES].cpu(), torch.tensor([0.0294, 0.5, 0.75, 0.9]),
                               atol=2e-3, rtol=0)
    assert sorted(os.listdir(out / "checkpoints")) == ["step_000004"]
    assert Image.open(out / "samples" / "step_000004.png").size == (4 * 128, 2 * 128 + 14)


def test_lora_loads_into_a_stock_sd3_pipeline(e2e, sd3_model):
    from safetensors import safe_open
    out, m = e2e
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert (meta["transformer.r"], meta["transformer.lora_alpha"]) == (4, 8)
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_model, text_encoder_3=None, tokenizer_3=None)
    pipe.scheduler = FlowMatchLCMScheduler.from_config(pipe.scheduler.config, shift=1.0)
    pipe.set_progress_bar_config(disable=True)
    sigmas = flash_sd3.student_sigmas(m.sigmas, 4)

    def run(n=4, **kw):
        return pipe("a red square", sigmas=sigmas[::4 // n], guidance_scale=0, height=32, width=32,
                    generator=torch.Generator().manual_seed(0), **kw).images

    before = run(output_type="np")
    pipe.load_lora_weights(str(out))
    assert np.abs(run(output_type="np") - before).max() > 1e-3
    cond = flash_sd3.encode_text([pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2],
                                 ["a red square"], 64, CPU)
    x = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the loaded LoRA, scale alpha / r = 2 included, is exactly the trained student
        v = flash_sd3.denoise(m.denoiser, x, torch.tensor([0.8965]), cond)
        torch.testing.assert_close(flash_sd3.denoise(pipe.transformer, x, torch.tensor([0.8965]), cond), v,
                                   rtol=1e-5, atol=1e-5)
        # one stock sampler step from pure noise is the student's one-step output x_hat = x_t - sigma v
        one = run(n=1, latents=x, output_type="latent")
        ref = flash_sd3.x0_from_v(x, flash_sd3.denoise(m.denoiser, x, torch.ones(1), cond), torch.ones(1))
    torch.testing.assert_close(one, ref, rtol=1e-5, atol=1e-5)


def test_resume_restores_the_tensors(e2e, sd3_model, shards, tmp_path, monkeypatch):
    from peft.utils import get_peft_model_state_dict
    src, _ = e2e
    out = tmp_path / "run"
    shutil.copytree(src, out)
    saved = load_state(out / "checkpoints" / "step_000004")
    first_seen = {}
    real_step = flash_sd3.train_step

    def spy(m, *a):  # what the resumed run's first step starts from
        if not first_seen:
            first_seen.update(lora={k: v.clone() for k, v in get_peft_model_state_dict(m.denoiser).items()},
                              disc={k: v.clone() for k, v in m.disc.state_dict().items()})
        return real_step(m, *a)

    monkeypatch.setattr(flash_sd3, "train_step", spy)
    _, step = flash_sd3.main(argv(sd3_model, shards, out, "--lr", "3e-3", "--phase_steps", "1", "1", "1", "2",
                                  "--keep_checkpoints", "0", "--resume", "latest"))
    assert step == 5 and [r["step"] for r in metrics(out)] == [1, 2, 3, 4, 5]
    for key in ("lora", "disc"):
        assert saved[key].keys() == first_seen[key].keys()
        assert all(torch.equal(saved[key][k], first_seen[key][k]) for k in saved[key])
    assert {int(s["step"]) for s in load_state(out / "checkpoints" / "step_000005")["opt_g"]["state"].values()} == {5}


# SD3.5 Medium's and Large's transformer configs (their sizes, 2,243.2M and 8,056.6M, are checked below)
SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                   num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                   pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384, qk_norm="rms_norm",
                   dual_attention_layers=tuple(range(13)))
SD35_LARGE = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
                  num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm")


def test_sd35_configs_are_recognised_and_their_lora_sizes(tmp_path):
    """The released SD3.5 transformer configs (written as a model folder's transformer/config.json) read as
    their family; rank-64 LoRA on LORA_TARGETS: 101.7M (Medium, its attn2 included) and 219.3M (Large)."""
    from diffusers import SD3Transformer2DModel
    from peft import LoraConfig
    for name, cfg, size, lora_m in (("SD3.5 Medium", SD35_MEDIUM, 2243.2, 101.7), ("SD3.5 Large", SD35_LARGE, 8056.6,
                                                                                     219.3)):
        with torch.device("meta"):
            net = SD3Transformer2DModel(**cfg)
            assert abs(sum(p.numel() for p in net.parameters()) / 1e6 - size) < 0.1
            net.requires_grad_(False).add_adapter(LoraConfig(r=64, lora_alpha=8,
                                                             target_modules=flash_sd3.LORA_TARGETS))
        assert abs(sum(p.numel() for p in net.parameters() if p.requires_grad) / 1e6 - lora_m) < 0.05
        net.save_config(tmp_path / name / "transformer")
        assert flash_sd3.model_family(str(tmp_path / name)) == name
    assert flash_sd3.model_family(str(tmp_path / "no-model")) == "SD3 Medium"  # check_args names that one


def test_defaults_follow_the_model_and_given_flags_win(sd3_model, sd35_model, tmp_path, capsys):
    large = tmp_path / "large" / "transformer"  # the tiny SD3 transformer with SD3.5 Large's RMS qk-norm
    large.mkdir(parents=True)
    with open(os.path.join(sd3_model, "transformer", "config.json")) as f:
        cfg = dict(json.load(f), qk_norm="rms_norm")
    (large / "config.json").write_text(json.dumps(cfg))

    def resolved(model, *flags):
        a = flash_sd3.parse_args(["--model", str(model), "--shards", "x.tar", *flags])
        return a.guidance_min, a.guidance_max, a.validation_teacher_steps, a.validation_teacher_guidance, a.use_t5

    assert [flash_sd3.model_family(m) for m in (sd3_model, sd35_model, large.parent)] == [
        "SD3 Medium", "SD3.5 Medium", "SD3.5 Large"]
    assert resolved(sd3_model) == (7.0, 13.0, 28, 7.0, False)  # the paper's range, the stock 28 steps at CFG 7
    assert resolved(sd35_model) == (3.5, 5.5, 40, 4.5, True)  # the card's 40 steps at CFG 4.5, w within 1 of it
    assert resolved(large.parent) == (2.5, 4.5, 28, 3.5, True)  # the card's 28 steps at CFG 3.5
    assert resolved(sd35_model, "--guidance_min", "2", "--no-use_t5", "--validation_teacher_steps", "8") == (
        2.0, 5.5, 8, 4.5, False)
    assert resolved(sd3_model, "--use_t5", "--guidance_max", "9", "--validation_teacher_guidance", "5") == (
        7.0, 9.0, 28, 5.0, True)
    with pytest.raises(common.UsageError, match="--guidance_min must not exceed --guidance_max"):
        flash_sd3.check_flags(flash_sd3.parse_args(["--model", sd35_model, "--shards", "x.tar", "--guidance_min",
                                                    "6"]))
    with pytest.raises(SystemExit):
        flash_sd3.parse_args(["-h"])
    text = " ".join(capsys.readouterr().out.split())
    assert "default: per model: SD3 Medium 7.0, SD3.5 Medium 3.5, SD3.5 Large 2.5" in text
    assert "default: per model: SD3 Medium 28, SD3.5 Medium 40, SD3.5 Large 28" in text
    assert "(default: None)" not in text.split("--guidance_min")[1].split("--distill_loss")[0]


@pytest.fixture(scope="module")
def e2e35(sd35_model, shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e35") / "run"
    m, step = flash_sd3.main(argv(sd35_model, shards, out, "--lr", "3e-3", "--phase_steps", "1", "1", "0", "0"))
    assert step == 2
    return out, m


def test_sd35_medium_trains_with_its_defaults_and_targets_its_second_attention(e2e35):
    from peft.utils import get_peft_model_state_dict
    out, m = e2e35
    rows = metrics(out)
    assert [r["phase"] for r in rows] == [0, 1] and rows[1]["adv"] > 0 and rows[1]["dmd"] > 0
    assert all(3.5 <= r["w"] <= 5.5 for r in rows)  # the teacher's CFG from SD3.5 Medium's range
    assert len(m.text_encoders) == 3  # T5 on by default
    with open(out / "log.txt") as f:
        flags = json.loads(next(line for line in f if "flags: " in line).split("flags: ", 1)[1])
    assert (flags["validation_teacher_steps"], flags["validation_teacher_guidance"], flags["use_t5"]) == (40, 4.5, True)
    hit = {n for n, mod in m.denoiser.named_modules() if hasattr(mod, "lora_A")}
    attn2 = {n for n in hit if ".attn2." in n}
    assert attn2 == {f"transformer_blocks.0.attn2.{p}" for p in ("to_q", "to_k", "to_v", "to_out.0")}
    assert {"transformer_blocks.0.norm1.linear", "transformer_blocks.0.attn.to_q", "transformer_blocks.1.attn.to_q",
            "transformer_blocks.0.ff.net.0.proj", "pos_embed.proj", "norm_out.linear", "proj_out"} <= hit
    assert not any("norm_q" in n or "norm_k" in n or "add_q_proj" in n for n in hit)  # RMS norms: no Linear
    assert any("attn2.to_q" in k and "lora_B" in k and v.abs().max() > 0  # the update reached attn2
               for k, v in get_peft_model_state_dict(m.denoiser).items())


def test_sd35_lora_loads_into_a_stock_sd3_pipeline_and_is_the_student(e2e35, sd35_model):
    out, m = e2e35
    pipe = StableDiffusion3Pipeline.from_pretrained(sd35_model)
    pipe.scheduler = FlowMatchLCMScheduler.from_config(pipe.scheduler.config, shift=1.0)
    pipe.set_progress_bar_config(disable=True)
    cond = flash_sd3.encode_text([pipe.tokenizer, pipe.tokenizer_2, pipe.tokenizer_3],
                                 [pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3], ["a red square"], 64,
                                 CPU)
    x = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = flash_sd3.denoise(pipe.transformer, x, torch.ones(1), cond)
        pipe.load_lora_weights(str(out))
        v = flash_sd3.denoise(m.denoiser, x, torch.ones(1), cond)
        assert (v - before).abs().max() > 1e-3
        torch.testing.assert_close(flash_sd3.denoise(pipe.transformer, x, torch.ones(1), cond), v, rtol=1e-5,
                                   atol=1e-5)
        # one stock sampler step from pure noise is the student's one-step output x_hat = x_t - sigma v
        one = pipe("a red square", sigmas=[1.0], guidance_scale=0, height=32, width=32, latents=x,
                   output_type="latent").images
    torch.testing.assert_close(one, flash_sd3.x0_from_v(x, v, torch.ones(1)), rtol=1e-5, atol=1e-5)


def test_an_sd35_run_resumes_with_its_model_defaults(e2e35, sd35_model, shards, tmp_path):
    src, _ = e2e35
    out = tmp_path / "run"
    shutil.copytree(src, out)
    m, step = flash_sd3.main(argv(sd35_model, shards, out, "--lr", "3e-3", "--phase_steps", "1", "2", "0", "0",
                                  "--resume", "latest"))
    assert step == 3 and [r["step"] for r in metrics(out)] == [1, 2, 3]
    assert 3.5 <= metrics(out)[-1]["w"] <= 5.5 and len(m.text_encoders) == 3  # SD3.5 Medium's range, T5 on
