"""flash_sd.py end to end on a tiny random SD1.5-layout model and tiny shards: the real code paths, on CPU."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import encode, load_state, metrics, random_image, write_shard

import common
import flash_sd


def argv(model, shards, out, *extra):
    return ["--model", model, "--shards", *shards, "--output_dir", str(out), "--resolution", "32",
            "--batch_size", "2", "--phase_steps", "1", "1", "1", "1", "--num_teacher_steps", "4",
            "--mixed_precision", "no", "--num_workers", "1", "--lora_rank", "4", "--lora_alpha", "4",
            "--log_every", "1", "--sample_every", "100", "--checkpoint_every", "100",
            "--validation_prompts", "a red square", "a blue circle", *extra]


def tiny_args(model, shards, out, *extra):
    return flash_sd.parse_args(argv(model, shards, out, *extra))


# ---------------------------------------------------------------------------------------------------------
# command line and start-up checks
# ---------------------------------------------------------------------------------------------------------

CONTRACT = ["--model", "--shards", "--output_dir", "--resolution", "--batch_size", "--phase_steps", "--max_steps",
            "--num_teacher_steps", "--guidance_min", "--guidance_max", "--lr", "--lr_disc", "--lora_rank",
            "--lora_alpha", "--distill_loss", "--gan_loss", "--teacher_as_real", "--min_aesthetic",
            "--mixed_precision", "--compile", "--gradient_checkpointing", "--num_workers", "--seed", "--log_every",
            "--sample_every", "--checkpoint_every", "--keep_checkpoints", "--resume", "--validation_prompts"]


def test_help_shows_the_contract_with_paper_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        flash_sd.parse_args(["-h"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in CONTRACT:
        assert flag in text, flag
    args = flash_sd.parse_args(["--shards", "x.tar"])
    assert (args.model, args.resolution, args.batch_size) == ("stable-diffusion-v1-5/stable-diffusion-v1-5", 512, 4)
    assert args.phase_steps == [2500] * 4 and args.num_teacher_steps == 32
    assert (args.guidance_min, args.guidance_max, args.lr, args.lr_disc) == (3.0, 13.0, 1e-5, 1e-5)
    assert (args.lora_rank, args.lora_alpha, args.min_aesthetic) == (128, 128, 6.0)
    assert args.dmd_weights == [0, .3, .5, .7] and args.adv_weights == [0, .1, .2, .3]
    assert (args.distill_loss, args.gan_loss, args.mixed_precision) == ("lpips", "lsgan", "bf16")


def test_unknown_flag_fails():
    with pytest.raises(SystemExit) as e:
        flash_sd.parse_args(["--shards", "x.tar", "--learning_rate", "1"])
    assert e.value.code == 2


@pytest.mark.parametrize("case, flag", [("shards", "--shards"), ("model", "--model"), ("resolution", "--resolution"),
                                        ("output", "--output_dir"), ("guidance", "--guidance_min")])
def test_bad_start_up_input_is_one_clear_error(sd_model, shards, tmp_path, case, flag):
    out = tmp_path / "run"
    a = argv(sd_model, shards, out)
    if case == "shards":
        a[a.index("--shards") + 1] = str(tmp_path / "missing-{0..3}.tar")
    elif case == "model":
        a[a.index("--model") + 1] = str(tmp_path / "no-model-here")
    elif case == "resolution":
        a[a.index("--resolution") + 1] = "36"  # must be a multiple of 8
    elif case == "output":
        out.mkdir()
        (out / "metrics.jsonl").write_text("{}\n")
    elif case == "guidance":
        a += ["--guidance_min", "9", "--guidance_max", "3"]
    with pytest.raises(common.UsageError) as e:
        flash_sd.main(a)
    msg = str(e.value)
    assert flag in msg and "\n" not in msg
    if case == "output":
        assert "--overwrite" in msg


@pytest.mark.parametrize("flag, value, says", [
    ("--lr", "0", "0: must be positive"), ("--batch_size", "-2", "-2: must be positive"),
    ("--batch_size", "2.5", "invalid int value: '2.5'"), ("--num_workers", "-1", "-1: must not be negative"),
    ("--backward_sim", "1.5", "1.5: a probability: between 0 and 1"),
    ("--num_teacher_steps", "3", "3: K must be between 4 and 1000"),
    ("--phase_steps", "-1", "-1: must not be negative")])
def test_a_flag_out_of_range_is_refused_by_the_parser_on_one_last_line(sd_model, shards, tmp_path, capsys, flag,
                                                                        value, says):
    a = argv(sd_model, shards, tmp_path / "run", flag, value, *(["0", "0", "1"] if flag == "--phase_steps" else []))
    with pytest.raises(SystemExit) as e:
        flash_sd.main(a)
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(f" error: argument {flag}: {says}")


# ---------------------------------------------------------------------------------------------------------
# the backbone pieces
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def loaded(sd_model, shards, tmp_path_factory):
    args = tiny_args(sd_model, shards, tmp_path_factory.mktemp("o"), "--distill_loss", "l2")
    return args, flash_sd.build(args, torch.device("cpu"))


def test_teacher_is_the_base_model_and_the_lora_trains_the_student(loaded, sd_model):
    from diffusers import UNet2DConditionModel
    args, m = loaded
    unet = m.denoiser
    base = UNet2DConditionModel.from_pretrained(sd_model, subfolder="unet")
    torch.manual_seed(0)
    x, t, c = torch.randn(2, 4, 16, 16), torch.tensor([999, 500]), torch.randn(2, 77, 32)
    with torch.no_grad():
        ref = base(x, t, encoder_hidden_states=c).sample
        with flash_sd.teacher_mode(unet):
            assert torch.equal(unet(x, t, encoder_hidden_states=c).sample, ref)
    # one optimizer step on the LoRA moves the student but not the teacher
    lora = [p for p in unet.parameters() if p.requires_grad]
    assert lora and all(p.dtype == torch.float32 for p in lora)
    n_attn = sum(1 for n, _ in unet.named_modules() if n.endswith(("attn1", "attn2")))
    assert len(lora) == n_attn * 4 * 2  # q, k, v, out of every attention, A and B
    opt = torch.optim.AdamW(lora, lr=1e-2)
    unet(x, t, encoder_hidden_states=c).sample.square().mean().backward()
    opt.step()
    opt.zero_grad()
    with torch.no_grad():
        student = unet(x, t, encoder_hidden_states=c).sample
        with flash_sd.teacher_mode(unet):
            teacher = unet(x, t, encoder_hidden_states=c).sample
    assert torch.equal(teacher, ref)
    assert (student - ref).abs().max() > 1e-4
    assert sum(p.numel() for p in base.parameters()) == sum(p.numel() for n, p in unet.named_parameters()
                                                           if "lora_" not in n)  # one copy of the weights


def test_mid_features_equal_the_mid_block_output_of_the_full_forward(loaded):
    args, m = loaded
    unet = m.denoiser
    seen = []
    hook = unet.mid_block.register_forward_hook(lambda mod, i, o: seen.append(o))
    torch.manual_seed(1)
    x, t, c = torch.randn(2, 4, 16, 16), torch.tensor([10, 750]), torch.randn(2, 77, 32)
    with torch.no_grad(), flash_sd.teacher_mode(unet):
        unet(x, t, encoder_hidden_states=c)
        feats = flash_sd.mid_features(unet, x, t, c)
    hook.remove()
    assert feats.shape == (2, 64, 8, 8)
    torch.testing.assert_close(feats, seen[0], rtol=0, atol=1e-6)
    d = flash_sd.make_discriminator(64, 8)
    assert d(feats).shape == (2, 1)  # 8x8 -> k3 s1 -> 8x8 -> k4 s2 -> 4x4 -> k4 s1 p0 -> one logit
    for size, logits in ((16, 25), (2, 1), (1, 1)):  # other feature sizes: a logit map, never a shape error
        assert flash_sd.make_discriminator(64, size)(torch.randn(3, 64, size, size)).shape == (3, logits)
    assert flash_sd.make_discriminator(1280, 8)(torch.randn(1, 1280, 8, 8)).shape == (1, 1)  # SD1.5 at 512 px


def test_sd15_discriminator_head_size_matches_the_published_count():
    lora = sum(128 * (i + o) for i, o in SD15_ATTN_PROJECTIONS)  # A: r x in, B: out x r
    head = sum(p.numel() for p in flash_sd.make_discriminator(1280, 8).parameters())
    assert abs((lora + head) / 1e6 - 26.4) < 0.1  # the paper's published LoRA + D size for SD1.5


def _sd15_attention_projections():
    """(in, out) of every to_q/to_k/to_v/to_out.0 in the real SD1.5 UNet (16 transformer blocks)."""
    dims = [320] * 2 + [640] * 2 + [1280] * 2 + [1280] + [1280] * 3 + [640] * 3 + [320] * 3
    out = []
    for d in dims:
        out += [(d, d)] * 4  # self-attention q, k, v, out
        out += [(d, d), (768, d), (768, d), (d, d)]  # cross-attention: k, v read the 768-d text states
    return out


SD15_ATTN_PROJECTIONS = _sd15_attention_projections()


def test_teacher_solve_matches_the_stock_pipeline(loaded):
    """Our K-step CFG solve from pure noise is exactly StableDiffusionPipeline with DPM-Solver++ (trailing)."""
    from diffusers import StableDiffusionPipeline
    args, m = loaded
    tok, te, vae, unet, sched = m.tokenizer, m.text_encoder, m.vae, m.denoiser, m.teacher_sched
    cond = flash_sd.encode_text(tok, te, ["a red square", "a blue circle"], torch.device("cpu"))
    uncond = flash_sd.encode_text(tok, te, [""], torch.device("cpu")).expand(2, -1, -1)
    torch.manual_seed(0)
    x_t = torch.randn(2, 4, 16, 16)
    sched.set_timesteps(4)
    ours = flash_sd.teacher_solve(m, x_t, 0, cond, uncond, 5.0)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    with flash_sd.teacher_mode(unet):
        stock = pipe(["a red square", "a blue circle"], num_inference_steps=4, guidance_scale=5.0, latents=x_t,
                     output_type="latent", height=32, width=32).images
    torch.testing.assert_close(ours, stock.float() / vae.config.scaling_factor * vae.config.scaling_factor,
                               rtol=1e-4, atol=1e-4)
    # from a later start index the solve runs only the remaining steps
    sched.set_timesteps(4)
    assert list(sched.timesteps) == [999, 749, 499, 249]


# ---------------------------------------------------------------------------------------------------------
# whole runs through main(argv)
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def messy_shards(tmp_path_factory):
    """Odd image modes and an over-long caption (all usable) among more bad samples of every kind, so a short
    run is sure to meet each kind."""
    rng = np.random.default_rng(1)
    d = tmp_path_factory.mktemp("messy")
    good = encode(random_image(rng))
    samples = [
        dict(png=encode(random_image(rng, 12, "L"), "PNG"), json={"caption": "small grey", "aesthetic_score": 7}),
        dict(png=encode(random_image(rng, 40, "P"), "PNG"), json={"caption": "palette", "aesthetic_score": 7}),
        dict(webp=encode(random_image(rng, 40, "RGBA"), "WEBP"), json={"caption": "rgba", "aesthetic_score": 7}),
        dict(jpg=encode(random_image(rng, 40, "CMYK")), json={"caption": "cmyk", "aesthetic_score": 7}),
        dict(jpg=good, json={"caption": "long " * 200, "aesthetic_score": 7}),
    ]
    for i in range(4):
        samples += [
            dict(jpg=b"not an image at all", json={"caption": "corrupt", "aesthetic_score": 7}),
            dict(jpg=good[: len(good) // 2], json={"caption": "truncated", "aesthetic_score": 7}),
            dict(json={"caption": "no image", "aesthetic_score": 7}),
            dict(jpg=good, json={"aesthetic_score": 7}),
            dict(jpg=good),
        ]
    return [write_shard(d / "messy.tar", samples)]


@pytest.fixture(scope="module")
def e2e_run(sd_model, shards, messy_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "run"
    m, step = flash_sd.main(argv(sd_model, messy_shards, out, "--lr", "3e-3", "--lr_disc", "3e-3", "--lora_alpha",
                                 "8", "--sample_every", "4", "--checkpoint_every", "2", "--keep_checkpoints", "1"))
    assert step == 4
    return out, m


def test_end_to_end_writes_metrics_samples_checkpoints_and_lora(e2e_run):
    out, m = e2e_run
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and [r["phase"] for r in rows] == [0, 1, 2, 3]
    assert all(r["K"] == 4 and r["t"] in (999, 749, 499, 249) for r in rows)
    # active terms are non-zero, inactive ones exactly zero: warm-up has no DMD and no GAN term
    assert rows[0]["dmd"] == 0 and rows[0]["adv"] == 0 and rows[0]["distill"] > 0 and rows[0]["disc"] > 0
    for r in rows[1:]:
        assert r["dmd"] > 0 and r["adv"] > 0 and r["distill"] > 0 and r["disc"] > 0
    assert all(np.isfinite(r["loss_g"]) and r["it_per_s"] > 0 and r["peak_mem_gb"] > 0 for r in rows)
    # bad samples were skipped and counted; nothing non-finite
    data = rows[-1]["data"]
    assert data["bad_image"] >= 2 and data["no_caption"] >= 2 and rows[-1]["nonfinite"] == 0
    assert data["read"] >= 8 + data["bad_image"] + data["no_caption"]
    # one checkpoint kept (the newest), the grid, the final LoRA
    assert sorted(os.listdir(out / "checkpoints")) == ["step_000004"]
    assert set(os.listdir(out / "checkpoints" / "step_000004")) == {
        "training_state.pt", "pytorch_lora_weights.safetensors", "flash_sd_comfyui.safetensors"}
    from PIL import Image
    grid = Image.open(out / "samples" / "step_000004.png")
    assert grid.size == (4 * 128, 2 * 128 + 14)  # 4 columns (teacher, student 1/2/4) x 2 prompts, upscaled
    assert np.asarray(grid).std() > 10
    assert (out / "pytorch_lora_weights.safetensors").exists()


def test_final_lora_loads_into_a_stock_pipeline_and_changes_it(e2e_run, sd_model):
    from diffusers import LCMScheduler, StableDiffusionPipeline
    from safetensors import safe_open
    out, m = e2e_run
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert (meta["unet.r"], meta["unet.lora_alpha"]) == (4, 8)  # scale alpha / r = 2 travels with the file
    pipe = StableDiffusionPipeline.from_pretrained(sd_model, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    pipe.set_progress_bar_config(disable=True)

    def run():
        return pipe("a red square", num_inference_steps=4, guidance_scale=0, height=32, width=32,
                    generator=torch.Generator().manual_seed(0), output_type="np").images

    before = run()
    pipe.load_lora_weights(str(out))
    after = run()
    assert np.abs(after - before).max() > 1e-3
    # the loaded LoRA, scale included, is exactly the trained student
    torch.manual_seed(0)
    x, t, c = torch.randn(1, 4, 16, 16), torch.tensor([749]), torch.randn(1, 77, 32)
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, t, encoder_hidden_states=c).sample,
                                   m.denoiser(x, t, encoder_hidden_states=c).sample, rtol=1e-5, atol=1e-5)


def test_resume_continues_from_the_saved_state(sd_model, shards, tmp_path, monkeypatch):
    from peft.utils import get_peft_model_state_dict
    out = tmp_path / "run"
    common_args = ["--phase_steps", "2", "2", "0", "0", "--checkpoint_every", "2", "--distill_loss", "l2",
                   "--lr", "3e-3", "--lr_disc", "3e-3", "--keep_checkpoints", "0"]
    _, step = flash_sd.main(argv(sd_model, shards, out, *common_args, "--max_steps", "2"))
    assert step == 2 and os.listdir(out / "checkpoints") == ["step_000002"]
    saved = load_state(out / "checkpoints" / "step_000002")
    assert saved["step"] == 2 and isinstance(saved["config"], dict)

    for flag, value in (("--lora_alpha", "8"), ("--lora_rank", "8"), ("--model", str(tmp_path / "other"))):
        if flag == "--model":
            shutil.copytree(sd_model, tmp_path / "other")
        with pytest.raises(common.UsageError, match=flag):  # another LoRA or base model cannot continue
            flash_sd.main(argv(sd_model, shards, out, *common_args, "--resume", "latest", flag, value))
    first_seen = {}
    real_step = flash_sd.train_step

    def spy(m, *a):  # what the resumed run's first step starts from
        if not first_seen:
            first_seen.update(lora={k: v.clone() for k, v in get_peft_model_state_dict(m.denoiser).items()},
                              disc={k: v.clone() for k, v in m.disc.state_dict().items()})
        return real_step(m, *a)

    monkeypatch.setattr(flash_sd, "train_step", spy)
    _, step = flash_sd.main(argv(sd_model, shards, out, *common_args, "--resume", "latest", "--lr_disc", "1e-4"))
    assert step == 4
    assert all(torch.equal(first_seen["lora"][k], saved["lora"][k]) for k in saved["lora"])
    assert all(torch.equal(first_seen["disc"][k], saved["disc"][k]) for k in saved["disc"])
    final = load_state(out / "checkpoints" / "step_000004")
    # the optimizers continued from their saved state (AdamW's step count 2 -> 4), at the command line's rates
    assert {int(s["step"]) for s in final["opt_g"]["state"].values()} == {4}
    assert {int(s["step"]) for s in final["opt_d"]["state"].values()} == {4}
    assert (final["opt_g"]["param_groups"][0]["lr"], final["opt_d"]["param_groups"][0]["lr"]) == (3e-3, 1e-4)
    assert "'lr_disc': (0.003, 0.0001)" in open(out / "log.txt").read()  # what changed since the checkpoint
    # the run continued: steps 3 and 4 logged after 1 and 2, a later checkpoint, LoRA moved on
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4]
    assert sorted(os.listdir(out / "checkpoints")) == ["step_000002", "step_000004"]
    assert any(not torch.equal(final["lora"][k], saved["lora"][k]) for k in saved["lora"])
    # resuming a finished run does nothing more
    _, step = flash_sd.main(argv(sd_model, shards, out, *common_args, "--resume", "latest"))
    assert step == 4 and len(metrics(out)) == 4


def test_no_sample_passes_the_aesthetic_filter(sd_model, tmp_path):
    rng = np.random.default_rng(2)
    plain = [dict(jpg=encode(random_image(rng)), json={"caption": f"c{i}"}) for i in range(8)]
    shard = write_shard(tmp_path / "noscore.tar", plain)
    a = argv(sd_model, [shard], tmp_path / "run")
    a[a.index("--mixed_precision"):a.index("--mixed_precision")] = ["--min_aesthetic", "6"]
    with pytest.raises(RuntimeError, match="--min_aesthetic"):
        flash_sd.main(a)


def test_bf16_autocast_run(sd_model, shards, tmp_path):
    out = tmp_path / "run"
    m, step = flash_sd.main(argv(sd_model, shards, out, "--mixed_precision", "bf16", "--phase_steps", "0", "1", "0",
                                 "0", "--distill_loss", "l2"))
    r = metrics(out)[-1]
    assert step == 1 and all(np.isfinite(r[k]) and r[k] > 0 for k in ("distill", "dmd", "adv", "disc"))
    assert all(p.dtype == torch.float32 for p in m.denoiser.parameters() if p.requires_grad)


@pytest.mark.skipif(os.environ.get("FLASH_SKIP_COMPILE") == "1", reason="FLASH_SKIP_COMPILE=1")
def test_compile_compiles_the_blocks_in_place_and_matches_eager(sd_model, shards, tmp_path, monkeypatch):
    """--compile compiles the repeated blocks in place (no wrapper, so the saved keys are the eager run's)
    and a training step computes the same losses and LoRA gradients. Inductor compiles slowly on a CPU
    (each block shape, grad mode and LoRA state is a graph), so one warm-up step through train_step, with
    the mid block's transformer block compiled; which blocks the real COMPILE_BLOCKS selects is checked apart."""
    from peft.utils import get_peft_model_state_dict
    args = tiny_args(sd_model, shards, tmp_path, "--phase_steps", "1", "0", "0", "0", "--distill_loss", "l2")
    batch = next(iter(common.make_loader(args.shards, 32, 2, num_workers=0, min_aesthetic=-1)))
    eager = flash_sd.build(args, torch.device("cpu"))
    selected = [b for b in eager.denoiser.modules() if type(b).__name__ in flash_sd.COMPILE_BLOCKS]
    assert len(selected) == 12  # the tiny UNet's 4 transformer and 8 ResNet blocks
    monkeypatch.setattr(flash_sd, "COMPILE_BLOCKS", ("BasicTransformerBlock",))
    steps = []
    for compiled in (False, True):
        torch.manual_seed(0)
        m = flash_sd.build(args, torch.device("cpu"))
        if compiled:
            flash_sd.compile_blocks(m.denoiser.mid_block)
        torch.manual_seed(1)
        losses = flash_sd.train_step(m, m.denoiser, m.disc, batch, 0, args)
        grads = {n: p.grad.clone() for n, p in m.denoiser.named_parameters() if p.requires_grad}
        steps.append((m, losses, grads))
    (eager, l_eager, g_eager), (comp, l_comp, g_comp) = steps
    blocks = [b for b in comp.denoiser.modules() if type(b).__name__ == "BasicTransformerBlock"]
    mid = list(comp.denoiser.mid_block.attentions[0].transformer_blocks)
    assert len(blocks) == 4 and [b for b in blocks if b._compiled_call_impl is not None] == mid and len(mid) == 1
    assert all(b._compiled_call_impl is None for b in eager.denoiser.modules())
    for k in ("distill", "disc"):
        assert l_eager[k] > 0 and float(l_comp[k]) == pytest.approx(float(l_eager[k]), rel=1e-3), k
    assert g_eager.keys() == g_comp.keys() and max(g.abs().max() for g in g_eager.values()) > 0
    assert all(torch.allclose(g_eager[n], g_comp[n], rtol=1e-3, atol=1e-6) for n in g_eager)
    a, b = (get_peft_model_state_dict(r.denoiser) for r in (eager, comp))
    assert sorted(a) == sorted(b) and not any("_orig_mod" in k for k in b)
    with pytest.raises(common.UsageError, match="--compile: no BasicTransformerBlock in this model"):
        flash_sd.compile_blocks(torch.nn.Linear(2, 2))


def test_gradient_checkpointing_gives_the_same_update(sd_model, shards, tmp_path):
    """Same seed, same data: one update with --gradient_checkpointing (the UNet's and the VAE decoder's, which
    the LPIPS loss backpropagates through) equals one without (the GAN feature pass in teacher mode must not
    be recomputed with the LoRA switched back on)."""
    from peft.utils import get_peft_model_state_dict
    runs = [flash_sd.main(argv(sd_model, shards, tmp_path / f"run{i}", *flag, "--phase_steps", "0", "1", "0", "0",
                               "--distill_loss", "lpips", "--lr", "1e-2", "--lr_disc", "1e-2", "--adv_weights", "0", "1",
                               "0", "0", "--validation_prompts", "a"))[0]
            for i, flag in enumerate([[], ["--gradient_checkpointing"]])]
    assert runs[1].denoiser.is_gradient_checkpointing and not runs[0].denoiser.is_gradient_checkpointing
    assert runs[1].vae.decoder.gradient_checkpointing and not runs[0].vae.decoder.gradient_checkpointing
    a, b = (get_peft_model_state_dict(r.denoiser) for r in runs)
    assert max(a[k].abs().max() for k in a if "lora_B" in k) > 1e-3  # B starts at zero: the update moved it
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_public_dataset_layouts_train(sd_model, tmp_path):
    """Shards as img2dataset writes them (jpg + txt + json with caption and LAION-aesthetics' `aesthetic`)
    train with --aesthetic_key aesthetic; jpg + txt shards (cc3m-wds) with --min_aesthetic -1."""
    rng = np.random.default_rng(7)
    laion = [dict(__key__=f"{i:09d}", jpg=encode(random_image(rng)), txt=f"laion {i}".encode(),
                  json={"caption": f"laion {i}", "aesthetic": [7.1, "6.5", 3.0][i % 3], "url": "https://x", "key": i})
             for i in range(9)]
    cc3m = [dict(__key__=f"{i:09d}", jpg=encode(random_image(rng)), txt=f"cc3m {i}".encode()) for i in range(6)]
    for name, samples, flags in (("laion", laion, ["--aesthetic_key", "aesthetic"]),
                                 ("cc3m", cc3m, ["--min_aesthetic", "-1"])):
        shard = write_shard(tmp_path / f"{name}.tar", samples)
        out = tmp_path / name
        _, step = flash_sd.main(argv(sd_model, [shard], out, *flags, "--phase_steps", "0", "2", "0", "0",
                                     "--distill_loss", "l2"))
        data = metrics(out)[-1]["data"]
        assert step == 2 and data["no_caption"] == 0
        assert data["filtered"] > 0 if name == "laion" else data["filtered"] == 0  # the 3.0 scores are dropped
