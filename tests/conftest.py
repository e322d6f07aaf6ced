"""Session fixtures: a tiny random SD1.5-layout diffusers folder and tiny webdataset shards, written here
so that the real loading code runs offline."""
import importlib
import io
import json
import os
import sys

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

sys.path.insert(0, os.path.join(ROOT, "bench"))
from models import DENOISERS, FLOW_FLUX, clip_config, t5_config, tiny_vae  # noqa: E402  (the tiny configs, shared)
from toy import byte_chars  # noqa: E402  (GPT-2's byte map, shared with the toy benchmark)

torch.set_num_threads(2)


def pytest_configure(config):
    """Warnings raised inside the libraries, which the suite cannot fix at their cause."""
    for line in (
            "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning",  # diffusers
            "ignore:The parameter 'pretrained' is deprecated:UserWarning",  # lpips builds VGG16 with it
            "ignore:Arguments other than a weight enum:UserWarning",  # the same call
            "ignore:The `disp` argument is deprecated:DeprecationWarning",  # clean-fid's scipy call
            "ignore:The `local_dir_use_symlinks` argument is deprecated:UserWarning"):  # diffusers' hub call
        config.addinivalue_line("filterwarnings", line)


# script: (its tiny model's fixture, extra flags); every build() names its LoRA-carrying network m.denoiser
SCRIPTS = {
    "flash_sd": ("sd_model", []),
    "flash_sdxl": ("sdxl_model", []),
    "flash_adapter": ("adapter_model", ["--adapter", "{model}/adapter"]),
    "flash_pixart": ("pixart_model", []),
    "flash_sd3": ("sd3_model", []),
    "flash_flux": ("flux_model", []),
}


@pytest.fixture(params=sorted(SCRIPTS))
def script(request):
    """(module, argv builder) for one script on its tiny model."""
    fixture, extra = SCRIPTS[request.param]
    model = request.getfixturevalue(fixture)
    mod = importlib.import_module(request.param)

    def argv(shards, out, *more):
        return ["--model", model, *(e.format(model=model) for e in extra), "--shards", *shards,
                "--output_dir", str(out), "--resolution", "32", "--batch_size", "2",
                "--phase_steps", "1", "1", "1", "1", "--num_teacher_steps", "4", "--mixed_precision", "no",
                "--num_workers", "1", "--lora_rank", "4", "--lora_alpha", "8", "--distill_loss", "l2",
                "--log_every", "1", "--sample_every", "100", "--checkpoint_every", "100",
                "--validation_prompts", "a red square", *more]
    return mod, argv


def load_state(ckpt_dir):
    """A checkpoint's training_state.pt, loaded as the scripts load it."""
    return torch.load(os.path.join(ckpt_dir, "training_state.pt"), map_location="cpu", weights_only=True)


def metrics(out):
    """The records a run wrote to metrics.jsonl, oldest first."""
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def byte_clip_tokenizer():
    """A CLIP BPE tokenizer over bytes, built in memory (no Hub): every byte is a token, with and without
    the end-of-word marker, plus a few word merges; start/end of text are the two highest ids."""
    from transformers import CLIPTokenizer
    chars = byte_chars()
    vocab = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges = [("a", "n</w>"), ("t", "h"), ("th", "e</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def make_sd_pipeline(path, seed=0):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(seed)
    tok = byte_clip_tokenizer()
    unet = UNet2DConditionModel(**DENOISERS[("sd", "tiny")][1])
    vae = AutoencoderKL(**tiny_vae())
    text_encoder = CLIPTextModel(CLIPTextConfig(**clip_config("tiny", vocab=len(tok))))
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path)
    return path


COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (30, 60, 220), "yellow": (230, 220, 40)}


def random_image(rng, size=40, mode="RGB"):
    from PIL import Image
    arr = rng.integers(0, 255, (size, size + 8, 3), dtype=np.uint8)
    return Image.fromarray(arr).convert(mode)


def encode(img, fmt="JPEG"):
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def write_shard(path, samples):
    """samples: list of dicts {key: bytes or dict}; dicts are written as json."""
    import webdataset as wds
    with wds.TarWriter(str(path)) as sink:
        for i, s in enumerate(samples):
            stem = os.path.basename(str(path)).split(".")[0]
            out = {"__key__": s.pop("__key__", f"{stem}_{i:05d}")}
            for k, v in s.items():
                out[k] = json.dumps(v).encode() if isinstance(v, dict) else v
            sink.write(out)
    return str(path)


def good_samples(n, rng, tag="", score=7.0):
    return [dict(jpg=encode(random_image(rng)), json={"caption": f"a {c} square {tag}{i}", "aesthetic_score": score})
            for i, c in zip(range(n), list(COLOURS) * n)]


@pytest.fixture(scope="session")
def sd_model(tmp_path_factory):
    return make_sd_pipeline(str(tmp_path_factory.mktemp("models") / "tiny-sd"))


def with_scheduler(model, path, **changes):
    """A copy of the diffusers folder `model` at `path` whose scheduler config has `changes`."""
    import shutil
    shutil.copytree(model, path)
    config = os.path.join(path, "scheduler", "scheduler_config.json")
    with open(config) as f:
        values = json.load(f)
    with open(config, "w") as f:
        json.dump(dict(values, **changes), f)
    return str(path)


@pytest.fixture(scope="session")
def sd_v_model(sd_model, tmp_path_factory):
    """The tiny SD1.5 folder as a v-prediction model (SD 2.x's parameterisation)."""
    return with_scheduler(sd_model, tmp_path_factory.mktemp("models") / "tiny-sd-v",
                          prediction_type="v_prediction")


@pytest.fixture(scope="session")
def sd_v_zero_snr_model(sd_model, tmp_path_factory):
    """v prediction on a zero-terminal-SNR schedule (abar = 0 at t = 999), trailing spacing."""
    return with_scheduler(sd_model, tmp_path_factory.mktemp("models") / "tiny-sd-v-zero-snr",
                          prediction_type="v_prediction", rescale_betas_zero_snr=True,
                          timestep_spacing="trailing")


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    return [write_shard(d / f"train-{i}.tar", good_samples(16, rng, tag=f"s{i}-")) for i in range(2)]


@pytest.fixture(scope="session", autouse=True)
def _offline_lpips():
    """LPIPS's VGG trunk cannot be downloaded here: build it with a random trunk (its real linear heads).
    The product itself always asks for the real weights."""
    import lpips
    import common
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(common, "make_lpips", lambda: lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True,
                                                             verbose=False))
        yield


def make_sdxl_pipeline(path, seed=0):
    """Tiny SDXL layout: two CLIP encoders (the second with a projection), pooled embeddings and time ids."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    torch.manual_seed(seed)
    tok = byte_clip_tokenizer()
    unet = UNet2DConditionModel(**DENOISERS[("sdxl", "tiny")][1])
    vae = AutoencoderKL(**tiny_vae(scaling_factor=0.13025))
    cfg = clip_config("tiny", vocab=len(tok), hidden_act="gelu")
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=CLIPTextModel(CLIPTextConfig(**cfg)),
                                     text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**cfg)),
                                     tokenizer=tok, tokenizer_2=tok, unet=unet, scheduler=sched)
    pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def sdxl_model(tmp_path_factory):
    return make_sdxl_pipeline(str(tmp_path_factory.mktemp("models") / "tiny-sdxl"))


def make_adapter_pipeline(path, seed=0):
    """Tiny SDXL + T2I-Adapter layout with SDXL's block structure (a plain down block, then two cross-
    attention ones), so every adapter residual, the mid one included, has a place: 32 px images give 16x16
    latents and residuals of 8x8, 8x8, 4x4 and 4x4 (mid)."""
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLAdapterPipeline, T2IAdapter,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    torch.manual_seed(seed)
    tok = byte_clip_tokenizer()
    unet = UNet2DConditionModel(**DENOISERS[("adapter", "tiny")][1])
    vae = AutoencoderKL(**tiny_vae(scaling_factor=0.13025))
    adapter = T2IAdapter(in_channels=1, channels=[32, 64, 64, 64], num_res_blocks=1, downscale_factor=4,
                         adapter_type="full_adapter_xl")
    cfg = clip_config("tiny", vocab=len(tok), hidden_act="gelu")
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLAdapterPipeline(vae=vae, text_encoder=CLIPTextModel(CLIPTextConfig(**cfg)),
                                            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**cfg)),
                                            tokenizer=tok, tokenizer_2=tok, unet=unet, adapter=adapter, scheduler=sched)
    pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def adapter_model(tmp_path_factory):
    return make_adapter_pipeline(str(tmp_path_factory.mktemp("models") / "tiny-adapter"))


def t5_tokenizer():
    """A T5 (Unigram) tokenizer built in memory: <pad>, </s>, <unk>, then single characters and a few words."""
    from transformers import T5Tokenizer
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [(f"\u2581{w}", -1.0) for w in ("a", "red", "blue", "square", "circle", "the")]
    pieces += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789-"] + [("\u2581", -3.0)]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def make_pixart_pipeline(path, seed=0):
    """Tiny PixArt-alpha layout: a DiT with 8 output channels (epsilon and variance), T5, a 2-level VAE."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel
    torch.manual_seed(seed)
    tok = t5_tokenizer()
    transformer = PixArtTransformer2DModel(**DENOISERS[("pixart", "tiny")][1])
    vae = AutoencoderKL(**tiny_vae())
    text_encoder = T5EncoderModel(T5Config(**t5_config("tiny", vocab=len(tok))))
    sched = DPMSolverMultistepScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear")
    pipe = PixArtAlphaPipeline(tokenizer=tok, text_encoder=text_encoder, vae=vae, transformer=transformer,
                               scheduler=sched)
    pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def pixart_model(tmp_path_factory):
    return make_pixart_pipeline(str(tmp_path_factory.mktemp("models") / "tiny-pixart"))


def make_pixart_sigma_pipeline(path, seed=0):
    """Tiny PixArt-Sigma layout: the alpha DiT without size conditioning, SDXL's VAE scale, and the
    PixArtSigmaPipeline class in model_index.json."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel
    torch.manual_seed(seed)
    tok = t5_tokenizer()
    transformer = PixArtTransformer2DModel(**DENOISERS[("pixart", "tiny")][1], use_additional_conditions=False,
                                           interpolation_scale=1)
    vae = AutoencoderKL(**tiny_vae(scaling_factor=0.13025))
    text_encoder = T5EncoderModel(T5Config(**t5_config("tiny", vocab=len(tok))))
    sched = DPMSolverMultistepScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear")
    pipe = PixArtSigmaPipeline(tokenizer=tok, text_encoder=text_encoder, vae=vae, transformer=transformer,
                               scheduler=sched)
    pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def pixart_sigma_model(tmp_path_factory):
    return make_pixart_sigma_pipeline(str(tmp_path_factory.mktemp("models") / "tiny-pixart-sigma"))


def make_sd3_pipeline(path, seed=0):
    """Tiny SD3 layout: an MMDiT with 16 latent channels (one joint block, one context-pre-only block), two CLIP
    encoders with projections (hidden 16 and 32, so their concatenation is padded up to the joint width 64, as
    768 + 1280 is to 4096), T5, a 16-channel VAE with SD3's shift and scale, the shift-3 flow-matching scheduler."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel
    torch.manual_seed(seed)
    tok, tok3 = byte_clip_tokenizer(), t5_tokenizer()
    transformer = SD3Transformer2DModel(**DENOISERS[("sd3", "tiny")][1])
    vae = AutoencoderKL(**tiny_vae(latent_channels=16, shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False,
                                   use_post_quant_conv=False))
    clip = dict(clip_config("tiny", vocab=len(tok), hidden_act="gelu"))
    del clip["hidden_size"], clip["projection_dim"]
    t5 = T5EncoderModel(T5Config(vocab_size=len(tok3), d_model=64, d_kv=8, d_ff=37, num_layers=1, num_heads=4,
                                 pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=16, projection_dim=16, **clip)),
        tokenizer=tok,
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=32, projection_dim=32, **clip)),
        tokenizer_2=tok, text_encoder_3=t5, tokenizer_3=tok3)
    pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def sd3_model(tmp_path_factory):
    return make_sd3_pipeline(str(tmp_path_factory.mktemp("models") / "tiny-sd3"))


def make_sd35_pipeline(path, seed=0):
    """Tiny SD3.5 Medium layout: the tiny SD3 one with an MMDiT-X transformer, a second attention (attn2) in
    block 0 (dual_attention_layers) and RMS qk-norm."""
    from diffusers import SD3Transformer2DModel
    make_sd3_pipeline(path, seed)
    torch.manual_seed(seed)
    net = SD3Transformer2DModel(**DENOISERS[("sd3", "tiny")][1], dual_attention_layers=(0,), qk_norm="rms_norm")
    net.save_pretrained(os.path.join(path, "transformer"))
    return path


@pytest.fixture(scope="session")
def sd35_model(tmp_path_factory):
    return make_sd35_pipeline(str(tmp_path_factory.mktemp("models") / "tiny-sd35"))


def make_flux_pipeline(path, seed=0):
    """Tiny FLUX.1-dev layout: one double- and one single-stream block with a guidance embedding over 2x2-packed
    16-channel latents, CLIP (pooled) and T5 (width 32, the joint width), a VAE with FLUX's shift and scale, and
    FLUX's scheduler config (the resolution-dependent shift)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel
    torch.manual_seed(seed)
    tok, tok2 = byte_clip_tokenizer(), t5_tokenizer()
    vae = AutoencoderKL(**tiny_vae(latent_channels=16, shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False,
                                   use_post_quant_conv=False))
    pipe = FluxPipeline(
        transformer=FluxTransformer2DModel(**DENOISERS[("flux", "tiny")][1]),
        scheduler=FlowMatchEulerDiscreteScheduler(**FLOW_FLUX), vae=vae,
        text_encoder=CLIPTextModel(CLIPTextConfig(**clip_config("tiny", vocab=len(tok), hidden_act="gelu"))),
        tokenizer=tok, text_encoder_2=T5EncoderModel(T5Config(**t5_config("tiny", vocab=len(tok2)))), tokenizer_2=tok2)
    pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def flux_model(tmp_path_factory):
    return make_flux_pipeline(str(tmp_path_factory.mktemp("models") / "tiny-flux"))
