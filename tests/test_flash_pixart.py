"""flash_pixart.py on a tiny PixArt-alpha layout (DiT with 8 output channels, T5 with an attention mask):
the teacher equals the stock pipeline, the mask and the epsilon channels are handled, and the PEFT adapter
folder a run writes loads into a stock PixArtAlphaPipeline."""
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
from conftest import load_state, metrics

import flash_pixart


def argv(model, shards, out, *extra):
    return ["--model", model, "--shards", *shards, "--output_dir", str(out), "--resolution", "32",
            "--batch_size", "2", "--phase_steps", "1", "1", "1", "1", "--num_teacher_steps", "4",
            "--mixed_precision", "no", "--num_workers", "1", "--lora_rank", "4", "--lora_alpha", "8",
            "--distill_loss", "l2", "--log_every", "1", "--sample_every", "100", "--checkpoint_every", "100",
            "--validation_prompts", "a red square", "a blue circle", *extra]


@pytest.fixture(scope="module")
def loaded(pixart_model, shards, tmp_path_factory):
    args = flash_pixart.parse_args(argv(pixart_model, shards, tmp_path_factory.mktemp("o")))
    return flash_pixart.build(args, torch.device("cpu"))


def test_defaults_are_the_pixart_column():
    a = flash_pixart.parse_args(["--shards", "x.tar"])
    assert (a.model, a.resolution, a.batch_size, a.phase_steps) == ("PixArt-alpha/PixArt-XL-2-1024-MS", 1024, 2, [5000] * 4)
    assert (a.num_teacher_steps, a.guidance_min, a.guidance_max, a.lora_rank, a.lora_alpha) == (16, 2, 9, 64, 8)
    assert a.adv_weights == [0, .05, .1, .2] and a.dmd_weights == [0, .3, .5, .7]


def test_lora_targets_and_published_size_on_the_real_architecture():
    from diffusers import PixArtTransformer2DModel
    from peft import LoraConfig, get_peft_model
    with torch.device("meta"):
        net = PixArtTransformer2DModel(sample_size=128, caption_channels=4096, use_additional_conditions=True)
        assert abs(sum(p.numel() for p in net.parameters()) / 1e6 - 611.3) < 0.1
        net = get_peft_model(net, LoraConfig(r=64, lora_alpha=8, target_modules=flash_pixart.LORA_TARGETS))
    hit = {re.sub(r"transformer_blocks\.\d+", "transformer_blocks", n.removeprefix("base_model.model."))
           for n, mod in net.named_modules() if hasattr(mod, "lora_A")}
    assert "pos_embed.proj" in hit and "proj_out" in hit and "adaln_single.linear" in hit
    assert {"transformer_blocks.attn1.to_q", "transformer_blocks.attn2.to_out.0", "transformer_blocks.ff.net.0.proj",
            "transformer_blocks.ff.net.2", "caption_projection.linear_1"} <= hit
    lora = sum(p.numel() for p in net.parameters() if p.requires_grad)
    head = flash_pixart.make_discriminator(4, 128)
    assert head(torch.randn(1, 4, 128, 128)).shape == (1, 1)  # 128x128 eps map at 1024 px -> one logit
    assert abs((lora + sum(p.numel() for p in head.parameters())) / 1e6 - 66.5) < 0.2  # the paper's published size


def test_mask_and_epsilon_channels(loaded):
    tokenizer, encoder, net = loaded.tokenizer, loaded.text_encoder, loaded.denoiser
    cond = flash_pixart.encode_text(tokenizer, encoder, ["a red square"], 32, torch.device("cpu"), sizes=False)
    n_real = int(cond["mask"].sum())
    assert cond["text"].shape[1] == 120 and 1 < n_real < 120
    torch.manual_seed(0)
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([500])
    noisy = dict(cond, text=cond["text"].clone())
    noisy["text"][:, n_real:] = torch.randn_like(noisy["text"][:, n_real:]) * 10  # padding positions only
    with torch.no_grad():
        e = flash_pixart.denoise(net, x, t, cond)
        torch.testing.assert_close(flash_pixart.denoise(net, x, t, noisy), e)  # the mask hides the padding
        full = net(x, encoder_hidden_states=cond["text"], encoder_attention_mask=cond["mask"], timestep=t,
                   added_cond_kwargs=dict(resolution=None, aspect_ratio=None)).sample
        unmasked = flash_pixart.denoise(net, x, t, dict(noisy, mask=torch.ones_like(cond["mask"])))
    assert full.shape[1] == 8 and e.shape[1] == 4 and torch.equal(e, full[:, :4])  # epsilon, not the variance
    assert (unmasked - e).abs().max() > 1e-4  # without the mask the padding would leak in


def test_teacher_solve_matches_the_stock_pipeline(loaded):
    from diffusers import PixArtAlphaPipeline
    m = loaded
    tokenizer, encoder, vae, net, sched = m.tokenizer, m.text_encoder, m.vae, m.denoiser, m.teacher_sched
    assert not m.sizes and m.uncond["text"].shape == (1, 120, 32)  # the tiny model has no size conditioning
    prompts = ["a red square", "a blue circle"]
    cond = flash_pixart.encode_text(tokenizer, encoder, prompts, 32, torch.device("cpu"), sizes=False)
    uncond = flash_pixart.expand_cond(flash_pixart.encode_text(tokenizer, encoder, [""], 32, torch.device("cpu"),
                                                               sizes=False), 2)
    torch.manual_seed(0)
    x_t = torch.randn(2, 4, 16, 16)
    sched.set_timesteps(4)
    ours = flash_pixart.teacher_solve(m, x_t, 0, cond, uncond, 4.5)
    pipe = PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=vae, transformer=net, scheduler=sched)
    with flash_pixart.teacher_mode(net):
        stock = pipe(prompts, num_inference_steps=4, guidance_scale=4.5, latents=x_t, output_type="latent",
                     height=32, width=32, use_resolution_binning=False, clean_caption=False).images
    torch.testing.assert_close(ours, stock.float(), rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def e2e(pixart_model, shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "run"
    m, step = flash_pixart.main(argv(pixart_model, shards, out, "--lr", "3e-3", "--checkpoint_every", "2",
                                     "--keep_checkpoints", "1", "--sample_every", "4"))
    assert step == 4
    return out, m


def test_end_to_end_and_the_adapter_folder_in_a_stock_pipeline(e2e, pixart_model):
    from diffusers import LCMScheduler, PixArtAlphaPipeline
    from peft import PeftModel
    out, m = e2e
    rows = metrics(out)
    assert [r["phase"] for r in rows] == [0, 1, 2, 3] and rows[0]["adv"] == 0
    assert all(r["dmd"] > 0 and r["adv"] > 0 and r["disc"] > 0 for r in rows[1:])
    assert sorted(os.listdir(out / "checkpoints")) == ["step_000004"]
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(out / "checkpoints" / "step_000004"))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(out))
    from PIL import Image
    assert Image.open(out / "samples" / "step_000004.png").size == (4 * 128, 2 * 128 + 14)
    cfg = json.load(open(out / "adapter_config.json"))
    assert (cfg["r"], cfg["lora_alpha"]) == (4, 8)
    pipe = PixArtAlphaPipeline.from_pretrained(pixart_model)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    pipe.set_progress_bar_config(disable=True)

    def run():
        return pipe("a red square", num_inference_steps=4, guidance_scale=0, height=32, width=32,
                    use_resolution_binning=False, clean_caption=False,
                    generator=torch.Generator().manual_seed(0), output_type="np").images

    before = run()
    pipe.transformer = PeftModel.from_pretrained(pipe.transformer, str(out))
    assert np.abs(run() - before).max() > 1e-3
    cond = flash_pixart.encode_text(pipe.tokenizer, pipe.text_encoder, ["a"], 32, torch.device("cpu"), sizes=False)
    torch.manual_seed(0)
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([749])
    with torch.no_grad():  # the loaded adapter, scale alpha / r = 2 included, is exactly the trained student
        torch.testing.assert_close(flash_pixart.denoise(pipe.transformer, x, t, cond),
                                   flash_pixart.denoise(m.denoiser, x, t, cond), rtol=1e-5, atol=1e-5)


def test_resume_continues_from_the_saved_state(pixart_model, shards, tmp_path, monkeypatch):
    from peft.utils import get_peft_model_state_dict
    out = tmp_path / "run"
    args = ["--phase_steps", "1", "1", "0", "0", "--checkpoint_every", "1", "--keep_checkpoints", "0"]
    _, step = flash_pixart.main(argv(pixart_model, shards, out, *args, "--max_steps", "1"))
    assert step == 1
    saved = load_state(out / "checkpoints" / "step_000001")
    first_seen = {}
    real_step = flash_pixart.train_step

    def spy(m, *a):  # what the resumed run's first step starts from
        if not first_seen:
            first_seen.update(lora={k: v.clone() for k, v in get_peft_model_state_dict(m.denoiser).items()},
                              disc={k: v.clone() for k, v in m.disc.state_dict().items()})
        return real_step(m, *a)

    monkeypatch.setattr(flash_pixart, "train_step", spy)
    _, step = flash_pixart.main(argv(pixart_model, shards, out, *args, "--resume", "latest"))
    assert step == 2 and sorted(os.listdir(out / "checkpoints")) == ["step_000001", "step_000002"]
    for key in ("lora", "disc"):
        assert saved[key].keys() == first_seen[key].keys()
        assert all(torch.equal(saved[key][k], first_seen[key][k]) for k in saved[key])


# ---------------------------------------------------------------------------------------------------------
# PixArt-Sigma: 300 T5 tokens, no size conditioning, PixArtSigmaPipeline
# ---------------------------------------------------------------------------------------------------------

def test_the_variant_is_read_from_the_folder_else_the_vae_and_the_flag_wins(pixart_model, pixart_sigma_model, shards,
                                                                            tmp_path):
    def variant(model, *flags):
        return flash_pixart.pixart_variant(flash_pixart.parse_args(argv(model, shards, tmp_path / "o", *flags)))
    assert variant(pixart_model) == "alpha" and variant(pixart_sigma_model) == "sigma"
    assert variant(pixart_sigma_model, "--variant", "alpha") == "alpha"
    for model, expected in ((pixart_model, "alpha"), (pixart_sigma_model, "sigma")):  # no model_index.json
        copy = tmp_path / f"copy-{expected}"
        shutil.copytree(model, copy, ignore=shutil.ignore_patterns("model_index.json"))
        assert variant(str(copy)) == expected  # from the VAE's scaling factor


@pytest.fixture(scope="module")
def sigma_run(pixart_sigma_model, shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("sigma") / "run"
    m, step = flash_pixart.main(argv(pixart_sigma_model, shards, out, "--phase_steps", "0", "2", "0", "0", "--lr",
                                     "3e-3", "--sample_every", "2"))
    assert step == 2
    return out, m


def test_sigma_conditions_on_300_tokens_and_no_sizes_and_solves_as_the_stock_sigma_pipeline(sigma_run):
    from diffusers import PixArtSigmaPipeline
    _, m = sigma_run
    assert m.variant == "sigma" and not m.sizes and m.uncond["text"].shape == (1, 300, 32)
    prompts = ["a red square", "a blue circle"]
    cpu = torch.device("cpu")
    cond = flash_pixart.encode_text(m.tokenizer, m.text_encoder, prompts, 32, cpu, False, m.max_tokens)
    uncond = flash_pixart.expand_cond(m.uncond, 2)
    torch.manual_seed(0)
    x_t = torch.randn(2, 4, 16, 16)
    m.teacher_sched.set_timesteps(4)
    ours = flash_pixart.teacher_solve(m, x_t, 0, cond, uncond, 4.5)
    pipe = PixArtSigmaPipeline(tokenizer=m.tokenizer, text_encoder=m.text_encoder, vae=m.vae, transformer=m.denoiser,
                               scheduler=m.teacher_sched)
    with flash_pixart.teacher_mode(m.denoiser):
        stock = pipe(prompts, num_inference_steps=4, guidance_scale=4.5, latents=x_t, output_type="latent",
                     height=32, width=32, use_resolution_binning=False, clean_caption=False).images
    torch.testing.assert_close(ours, stock.float(), rtol=1e-4, atol=1e-4)


def test_sigma_adapter_folder_loads_into_a_stock_sigma_pipeline_as_the_student(sigma_run, pixart_sigma_model):
    from diffusers import PixArtSigmaPipeline
    from peft import PeftModel
    out, m = sigma_run
    assert (out / "samples" / "step_000002.png").exists()  # the grid through PixArtSigmaPipeline
    pipe = PixArtSigmaPipeline.from_pretrained(pixart_sigma_model)
    pipe.transformer = PeftModel.from_pretrained(pipe.transformer, str(out))
    cpu = torch.device("cpu")
    cond = flash_pixart.encode_text(pipe.tokenizer, pipe.text_encoder, ["a"], 32, cpu, False, 300)
    torch.manual_seed(1)
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([499])
    with torch.no_grad():
        student = flash_pixart.denoise(m.denoiser, x, t, cond)
        torch.testing.assert_close(flash_pixart.denoise(pipe.transformer, x, t, cond), student, rtol=1e-5, atol=1e-5)
        with flash_pixart.teacher_mode(m.denoiser):
            assert (flash_pixart.denoise(m.denoiser, x, t, cond) - student).abs().max() > 1e-4  # the LoRA trained


def test_a_sigma_run_resumes_as_sigma(sigma_run, pixart_sigma_model, shards, tmp_path):
    """The Σ run's checkpoint continues for one more update, with Σ's 300 tokens and without size conditioning."""
    src, _ = sigma_run
    out = tmp_path / "run"
    shutil.copytree(src, out)
    m, step = flash_pixart.main(argv(pixart_sigma_model, shards, out, "--phase_steps", "0", "3", "0", "0", "--lr",
                                     "3e-3", "--resume", "latest"))
    assert step == 3 and [r["step"] for r in metrics(out)] == [1, 2, 3]
    assert m.variant == "sigma" and m.max_tokens == 300 and not m.sizes
    assert sorted(os.listdir(out / "checkpoints"))[-1] == "step_000003"
