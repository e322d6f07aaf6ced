"""Training-step speed and memory of the flash_*.py scripts, beside the original code's step pattern.

For each backbone the script's own `train_step` runs on synthetic data of the real shapes (random pixels
in [-1, 1], captions, and the adapter's edge map), with the models built in memory the way the script's
`main()` builds them: `--size tiny` uses the test suite's tiny configs, `--size real` the released
architectures with random weights (no download). Beside it, in the same process and on the same models, a
*reference pattern* step does what the original code did (see `reference_step`): a deep-copied fp32
teacher, cond and uncond as two separate teacher passes, and the whole forward run a second time for the
discriminator update. Reported per backbone: seconds per generator update, samples/s per device, peak
memory, FLOPs per update (torch.utils.flop_counter over one eager step), the model-FLOPs utilisation on
CUDA, the speed-up and memory ratio against the reference, and one step's time broken down by part.

    python bench/speed.py --backbone sd --size tiny --steps 1 --warmup 0 --device cpu
    python bench/speed.py --backbone all --size tiny --device cpu
    python bench/speed.py --backbone sd --size real --resolution 128 --batch_size 1 --steps 2 --device cpu
    python bench/speed.py --backbone sdxl --size real --batch_size 2 --compile --warmup 2 --steps 5   # GPU

What one measured step is (the same for both patterns, so that times compare):
- the loss weights of phase 3 (`--phase`): distillation, DMD and GAN all on, as in phases 1-3;
- one fixed teacher start index: by default the mean index over the 4 phases' mixtures, so the teacher
  solve has the length of an average training step (18 of K = 32 steps for SD1.5, 9 of 16 for PixArt).
  The index is random in training; fixing it makes every timed step the same amount of work.

Stand-ins, so that nothing is downloaded: LPIPS is `lpips.LPIPS(net="vgg", pretrained=True,
pnet_rand=True)` (a random VGG16 trunk, the same compute as the real one; speed, not quality, is measured);
tokenizers are byte-level stand-ins with the real sequence lengths; PixArt's T5-XXL (4.7B) is replaced at
--size real by a T5 of the same width (4096) with 2 of its 24 layers, since the text encoder is a small
part of the step. The denoisers, VAEs and CLIP encoders are the real architectures.
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

BACKBONES = ["sd", "sdxl", "adapter", "pixart", "sd3"]
PEAK_NOTE = "dense bf16 peak: H100 SXM and H200 989 TFLOP/s, H100 PCIe 756 (override: --peak_tflops)"


# ------------------------------------------------------------------------------------------------------
# synthetic tokenizers: byte-level ids with each model's special tokens and sequence length. The scripts
# call tokenizer(prompts, padding="max_length", max_length=..., truncation=True, return_tensors="pt") and
# read .input_ids (and .attention_mask); tokenizing is a negligible part of a step.
# ------------------------------------------------------------------------------------------------------

class Encoding(dict):
    __getattr__ = dict.__getitem__


class ByteTokenizer:
    def __init__(self, vocab_size, max_length, bos=None, eos=1, pad=0, first_id=3):
        self.vocab_size, self.model_max_length = vocab_size, max_length
        self.bos, self.eos, self.pad, self.first_id = bos, eos, pad, first_id

    def __call__(self, prompts, padding="max_length", max_length=None, truncation=True, return_tensors="pt",
                 **unused):
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        n = max_length or self.model_max_length
        span = min(self.vocab_size, self.bos if self.bos is not None else self.vocab_size) - self.first_id
        rows = []
        for p in prompts:
            ids = [self.first_id + b % span for b in p.encode()][: n - 1 - (self.bos is not None)]
            rows.append(([self.bos] if self.bos is not None else []) + ids + [self.eos])
        width = n if padding == "max_length" else max(map(len, rows))
        ids = torch.tensor([r + [self.pad] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        return Encoding(input_ids=ids, attention_mask=mask)


def clip_tokenizer(vocab_size):
    # CLIP: start and end of text are the two highest ids, padding with the end token (as SD's tokenizers)
    return ByteTokenizer(vocab_size, 77, bos=vocab_size - 2, eos=vocab_size - 1, pad=vocab_size - 1, first_id=0)


def t5_tokenizer(vocab_size):
    return ByteTokenizer(vocab_size, 512, bos=None, eos=1, pad=0, first_id=3)


# ------------------------------------------------------------------------------------------------------
# model configs. tiny: the test suite's (tests/conftest.py builds its models from these). real: the released
# architectures.
# ------------------------------------------------------------------------------------------------------

SCALED_LINEAR = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                     steps_offset=1, prediction_type="epsilon")  # SD1.5 and SDXL schedulers
LINEAR = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
              prediction_type="epsilon")  # PixArt-alpha
FLOW_SHIFT3 = dict(num_train_timesteps=1000, shift=3.0)  # SD3

TINY_UNET = dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=32)
DENOISERS = {  # (class name in diffusers, config) per (backbone, size)
    ("sd", "tiny"): ("UNet2DConditionModel", dict(TINY_UNET, cross_attention_dim=32, attention_head_dim=8)),
    ("sd", "real"): ("UNet2DConditionModel", dict(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8)),
    ("sdxl", "tiny"): ("UNet2DConditionModel", dict(
        TINY_UNET, attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64)),
    ("sdxl", "real"): ("UNet2DConditionModel", dict(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=2048,
        attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)),
    ("adapter", "tiny"): ("UNet2DConditionModel", dict(
        TINY_UNET, block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4, 4),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=80, cross_attention_dim=64)),
    ("pixart", "tiny"): ("PixArtTransformer2DModel", dict(
        sample_size=16, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=2, caption_channels=32,
        in_channels=4, cross_attention_dim=16, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6)),
    ("pixart", "real"): ("PixArtTransformer2DModel", dict(
        sample_size=128, num_layers=28, patch_size=2, attention_head_dim=72, num_attention_heads=16,
        caption_channels=4096, in_channels=4, cross_attention_dim=1152, out_channels=8, attention_bias=True,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6)),
    ("sd3", "tiny"): ("SD3Transformer2DModel", dict(
        sample_size=16, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=48, out_channels=16,
        pos_embed_max_size=16)),
    ("sd3", "real"): ("SD3Transformer2DModel", dict(
        sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
        joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
        pos_embed_max_size=192)),
}
DENOISERS[("adapter", "real")] = DENOISERS[("sdxl", "real")]


def tiny_vae(**kw):
    return dict(dict(block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
                     down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                     norm_num_groups=32, sample_size=32), **kw)


def real_vae(**kw):
    return dict(block_out_channels=(128, 256, 512, 512), in_channels=3, out_channels=3, layers_per_block=2,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                norm_num_groups=32, **dict(dict(latent_channels=4, sample_size=512), **kw))


def clip_config(size, big=False, vocab=None, **kw):
    """CLIP text encoder: tiny (the tests'), ViT-L/14 (SD1.5, SDXL's first), or OpenCLIP bigG (`big`)."""
    vocab = vocab or (512 if size == "tiny" else 49408)
    if size == "tiny":
        dims = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, projection_dim=32)
    elif big:
        dims = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                    projection_dim=1280, hidden_act="gelu")
    else:
        dims = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                    projection_dim=768, hidden_act="quick_gelu")
    return dict(dims, vocab_size=vocab, bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1,
                max_position_embeddings=77, **kw)


def t5_config(size, vocab=None):
    if size == "tiny":
        return dict(vocab_size=vocab or 64, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, pad_token_id=0,
                    eos_token_id=1, decoder_start_token_id=0)
    # T5-XXL's width and heads (output 4096 wide, as the denoisers read it) with 2 of its 24 layers
    return dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=2, num_heads=64,
                feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)


def build_denoiser(backbone, size):
    import diffusers
    cls_name, cfg = DENOISERS[(backbone, size)]
    return getattr(diffusers, cls_name)(**cfg)


def build_parts(backbone, size, device, seed=0):
    """Every model the script's build() reads, keyed by the subfolder (or path) it reads it from; built
    directly on `device` so that large random inits run there. Schedulers are config dicts."""
    from diffusers import AutoencoderKL, T2IAdapter
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel
    torch.manual_seed(seed)
    tiny = size == "tiny"
    with torch.device(device):
        parts = dict(unet=None)
        if backbone == "sd":
            cfg = clip_config(size)
            parts = dict(tokenizer=clip_tokenizer(cfg["vocab_size"]), text_encoder=CLIPTextModel(CLIPTextConfig(**cfg)),
                         vae=AutoencoderKL(**(tiny_vae() if tiny else real_vae())),
                         unet=build_denoiser(backbone, size), scheduler=dict(SCALED_LINEAR))
        elif backbone in ("sdxl", "adapter"):
            c1 = clip_config(size, hidden_act="gelu") if tiny else clip_config(size)
            c2 = clip_config(size, hidden_act="gelu") if tiny else clip_config(size, big=True)
            vae = tiny_vae(scaling_factor=0.13025) if tiny else real_vae(scaling_factor=0.13025, sample_size=1024)
            parts = dict(tokenizer=clip_tokenizer(c1["vocab_size"]), tokenizer_2=clip_tokenizer(c2["vocab_size"]),
                         text_encoder=CLIPTextModel(CLIPTextConfig(**c1)),
                         text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**c2)),
                         vae=AutoencoderKL(**vae), unet=build_denoiser(backbone, size), scheduler=dict(SCALED_LINEAR))
            if backbone == "adapter":  # TencentARC/t2i-adapter-canny-sdxl-1.0 at real size (1-channel edges)
                parts["adapter"] = T2IAdapter(
                    in_channels=1, adapter_type="full_adapter_xl",
                    **(dict(channels=[32, 64, 64, 64], num_res_blocks=1, downscale_factor=4) if tiny
                       else dict(channels=[320, 640, 1280, 1280], num_res_blocks=2, downscale_factor=16)))
        elif backbone == "pixart":
            cfg = t5_config(size)
            parts = dict(tokenizer=t5_tokenizer(cfg["vocab_size"]), text_encoder=T5EncoderModel(T5Config(**cfg)),
                         vae=AutoencoderKL(**(tiny_vae() if tiny else real_vae())),
                         transformer=build_denoiser(backbone, size), scheduler=dict(LINEAR))
        elif backbone == "sd3":  # CLIP-L and CLIP-G with projections; T5 is off by default in flash_sd3.py
            c1, c2 = clip_config(size), clip_config(size, big=True)
            if tiny:  # the tests': hidden 16 and 32, so that their concatenation is padded up to the joint 64
                c1, c2 = (dict(c, hidden_size=h, projection_dim=h, hidden_act="gelu") for c, h in ((c1, 16), (c2, 32)))
            vae = dict(latent_channels=16, scaling_factor=1.5035, shift_factor=0.0609, use_quant_conv=False,
                       use_post_quant_conv=False)
            parts = dict(tokenizer=clip_tokenizer(c1["vocab_size"]), tokenizer_2=clip_tokenizer(c2["vocab_size"]),
                         text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**c1)),
                         text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**c2)),
                         vae=AutoencoderKL(**(tiny_vae(**vae) if tiny else real_vae(**dict(vae, sample_size=1024)))),
                         transformer=build_denoiser(backbone, size), scheduler=dict(FLOW_SHIFT3))
        else:
            raise ValueError(f"unknown backbone {backbone!r}")
    return {k: v for k, v in parts.items() if v is not None}


class FromMemory:
    """Stands in for a diffusers/transformers class inside a script's module while its build() runs:
    from_pretrained(path, subfolder=...) returns the in-memory object for that subfolder (or path) cast to
    the requested dtype, load_config its config; everything else (from_config ...) is the real class's."""

    def __init__(self, real, parts):
        self.real, self.parts = real, parts

    def _get(self, path, subfolder):
        key = subfolder or path
        if key not in self.parts:
            raise KeyError(f"bench/speed.py builds no {key!r} for {self.real.__name__}.from_pretrained; "
                           "add it to build_parts")
        return self.parts[key]

    def from_pretrained(self, path=None, subfolder=None, dtype=None, torch_dtype=None, **unused):
        obj = self._get(path, subfolder)
        if isinstance(obj, dict):
            return self.real.from_config(obj)
        dtype = dtype or torch_dtype
        return obj.to(dtype) if dtype is not None and isinstance(obj, torch.nn.Module) else obj

    def load_config(self, path=None, subfolder=None, **unused):
        obj = self._get(path, subfolder)
        return dict(obj) if isinstance(obj, dict) else dict(obj.config)

    def __getattr__(self, name):
        return getattr(self.real, name)


@contextlib.contextmanager
def models_from_memory(mod, parts):
    """Run a script's own build() on in-memory models: every diffusers/transformers class in the script's
    namespace is swapped for a FromMemory stand-in, and LPIPS for the offline one, restored afterwards."""
    saved = {n: v for n, v in vars(mod).items() if isinstance(v, type) and hasattr(v, "from_pretrained")
             and v.__module__.split(".")[0] in ("diffusers", "transformers")}
    real_lpips = common.make_lpips
    try:
        for n, v in saved.items():
            setattr(mod, n, FromMemory(v, parts))
        common.make_lpips = make_lpips
        yield
    finally:
        for n, v in saved.items():
            setattr(mod, n, v)
        common.make_lpips = real_lpips


# ------------------------------------------------------------------------------------------------------
# per-backbone entries: the extra batch keys each script's loader yields, and (for the reference
# pattern) its conditioning and features
# ------------------------------------------------------------------------------------------------------

def adapter_batch(m, args, B, g):
    edges = (torch.rand(B, m.adapter.config.in_channels, args.resolution, args.resolution, generator=g) > 0.9)
    return dict(edges=edges.float())


def encode_sd(mod, m, batch, args):
    dev = m.device
    cond = mod.encode_text(m.tokenizer, m.text_encoder, batch["text"], dev)
    return cond, m.uncond.expand(len(batch["text"]), -1, -1)


def encode_sdxl(mod, m, batch, args):
    cond = mod.encode_text(m.tokenizers, m.text_encoders, batch["text"], args.resolution, m.device)
    if "edges" in batch:  # adapter: its residuals go to every call, both CFG halves included
        edges = batch["edges"].to(m.device, non_blocking=True)
        cond["adapter"] = mod.adapter_residuals(m.adapter, edges, args.adapter_conditioning_scale)
    return cond, mod.zero_uncond(cond)


def encode_pixart(mod, m, batch, args):
    cond = mod.encode_text(m.tokenizer, m.text_encoder, batch["text"], args.resolution, m.device, m.sizes)
    return cond, mod.expand_cond(m.uncond, len(batch["text"]))


def unet_features(mod, m, net, x, t, cond):
    return mod.mid_features(net, x, t, cond)  # the script's own (its blocks compiled with --compile)


def eps_features(mod, m, net, x, t, cond):
    return mod.denoise(net, x, t, cond)  # the denoiser's own output (its blocks compiled with --compile)


@dataclass
class Backbone:
    script: str  # module name of the backbone script
    denoiser: str  # attribute of the script's build() namespace that is the (LoRA-carrying) denoiser
    extra_batch: Optional[Callable] = None  # extra keys the script's loader yields
    # reference pattern (epsilon-prediction backbones): conditioning and discriminator features
    encode: Optional[Callable] = None  # (mod, m, batch, args) -> (cond, uncond), batch-first
    features: Optional[Callable] = None  # (mod, m, net, x, t, cond) -> features
    notes: list = field(default_factory=list)


SPECS = {
    "sd": Backbone("flash_sd", "unet", encode=encode_sd, features=unet_features),
    "sdxl": Backbone("flash_sdxl", "unet", encode=encode_sdxl, features=unet_features),
    "adapter": Backbone("flash_adapter", "unet", extra_batch=adapter_batch, encode=encode_sdxl,
                        features=unet_features),
    "pixart": Backbone("flash_pixart", "transformer", encode=encode_pixart, features=eps_features,
                       notes=["T5: width 4096, 2 of T5-XXL's 24 layers at --size real"]),
    # flow matching: no reference pattern (its step math is written for epsilon prediction)
    "sd3": Backbone("flash_sd3", "transformer",
                    notes=["T5 as in the script's default (off unless its flag turns it on)"]),
}


def cat_cond(mod, a, b):
    return torch.cat([a, b]) if torch.is_tensor(a) else mod.cat_cond(a, b)


# ------------------------------------------------------------------------------------------------------
# building one backbone's step the way its script's main() does
# ------------------------------------------------------------------------------------------------------

def script_args(mod, opts, size):
    """The script's own defaults (paper values) through its own parser, with the benchmark's overrides."""
    argv = ["--shards", "synthetic", "--model", "in-memory", "--mixed_precision", opts.mixed_precision,
            "--distill_loss", opts.distill_loss, "--seed", str(opts.seed)]
    if opts.resolution or size == "tiny":
        argv += ["--resolution", str(opts.resolution or 32)]  # tiny: the tests' 32 px
    if opts.batch_size:
        argv += ["--batch_size", str(opts.batch_size)]
    if opts.num_teacher_steps:
        argv += ["--num_teacher_steps", str(opts.num_teacher_steps)]
    argv += ["--compile"] * opts.compile + ["--gradient_checkpointing"] * opts.gradient_checkpointing
    args = mod.parse_args(argv)
    if hasattr(args, "adapter"):
        args.adapter = "adapter"  # the key build_parts stores the adapter under
    return args


def default_start_index(K):
    """Mean start index over the 4 phases' mixtures (equal phase lengths): a fixed index with the solve
    length of an average training step."""
    means = [float((torch.arange(K) * common.start_index_probs(K, pi)).sum()) for pi in common.MODE_PROBS]
    return int(round(sum(means) / len(means)))


def build_step(name, opts, device, log):
    """Models, synthetic batch and the `m` holder for one backbone; returns a dict of what the runs need."""
    spec = SPECS[name]
    mod = importlib.import_module(spec.script)
    args = script_args(mod, opts, opts.size)
    # one fixed start index for every phase (see default_start_index), checked before any model is built
    K = args.num_teacher_steps
    k = default_start_index(K) if opts.start_index is None else opts.start_index
    if not 0 <= k < K:
        raise ValueError(f"--start_index {k}: must be in 0..{K - 1} (K = {K} for {name})")
    torch.backends.cuda.matmul.allow_tf32 = True  # as the scripts' main()
    torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed)

    parts = build_parts(name, opts.size, device, args.seed)
    down = 2 ** (len(parts["vae"].config.block_out_channels) - 1)
    den = parts.get("unet", parts.get("transformer"))
    unit = down * (2 ** (len(den.config.block_out_channels) - 1) if "block_out_channels" in den.config
                   else den.config.patch_size)
    if args.resolution % math.lcm(8, unit):
        raise ValueError(f"--resolution {args.resolution}: must be a multiple of {math.lcm(8, unit)} for {name}")
    n_params = sum(p.numel() for p in den.parameters())

    with models_from_memory(mod, parts):
        m = mod.build(args, device)
    del parts
    denoiser = getattr(m, spec.denoiser)
    if args.compile:
        compile_blocks(denoiser, mod.COMPILE_BLOCKS)
    # one process: the student and the head unwrapped, AdamW for each, as the script's main() makes them
    train = dict(student=denoiser, disc=m.disc,
                 opt_g=torch.optim.AdamW([p for p in denoiser.parameters() if p.requires_grad], lr=args.lr,
                                         **(dict(fused=True) if device.type == "cuda" else {})),
                 opt_d=torch.optim.AdamW(m.disc.parameters(), lr=args.lr_disc,
                                         **(dict(fused=True) if device.type == "cuda" else {})))

    # the fixed start index for every phase, and the phase whose loss weights apply
    m.start_probs = [torch.nn.functional.one_hot(torch.tensor(k), K).double()] * 4
    step = sum(args.phase_steps[:opts.phase])

    # what the loader yields: pixel_values (B, 3, H, W) in [-1, 1], captions, and the script's extra keys
    g = torch.Generator().manual_seed(args.seed)
    B, H = args.batch_size, args.resolution
    batch = dict(pixel_values=torch.rand(B, 3, H, H, generator=g) * 2 - 1,
                 text=[f"a photograph of a red fox number {i} in a snowy forest, golden hour" for i in range(B)])
    if spec.extra_batch is not None:
        batch.update(spec.extra_batch(m, args, B, g))
    if device.type == "cuda":
        batch = {k_: v.pin_memory() if torch.is_tensor(v) else v for k_, v in batch.items()}
    return dict(spec=spec, mod=mod, m=m, args=args, batch=batch, step=step, k=k, K=K, params=n_params, **train)


def compile_blocks(model, block_types):
    """--compile as the scripts do it: each repeated block compiled in place, room for every graph."""
    for block in model.modules():
        if type(block).__name__ in block_types:
            block.compile(dynamic=False)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 1024)


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
    return losses, ok, False


def make_lpips():
    """LPIPS-VGG with a random VGG16 trunk and the package's real linear heads: the real one's compute,
    built offline (no weights are downloaded)."""
    import lpips
    return lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)


# ------------------------------------------------------------------------------------------------------
# the reference pattern: what the original code did per batch, written with the same losses, the same
# solver steps and the same models, so that the difference is the pattern alone
# ------------------------------------------------------------------------------------------------------

def make_reference_teacher(b):
    """A separate fp32 deep copy of the denoiser without its LoRA (the original kept such a copy as the
    teacher and feature backbone); its blocks are compiled when the student's are."""
    den = getattr(b["m"], b["spec"].denoiser)
    teacher = copy.deepcopy(den)
    if isinstance(teacher, peft.PeftModel):
        teacher = teacher.unload()  # PixArt's get_peft_model wrapper: the base model, LoRA layers removed
    else:
        teacher.unload_lora()  # diffusers add_adapter
    teacher.float().requires_grad_(False).eval()
    if getattr(teacher, "is_gradient_checkpointing", False):
        teacher.disable_gradient_checkpointing()
    return teacher


class NoTimeline:
    def mark(self, label):
        pass


def reference_step(b, teacher, tl=None):
    """One batch the original way. Generator pass: student forward, teacher solve with cond and uncond as
    two passes of the fp32 teacher copy, the same three losses (the DMD real score also as two passes, the
    features from the teacher copy), G update. `teacher`: the copy (its blocks compiled when the student's
    are). Discriminator pass: the whole forward again (encode,
    student, teacher solve, features; the original ran its forward once per optimizer), then the D update.
    The G-only losses (LPIPS, DMD) are not recomputed in the D pass, which favours the reference."""
    spec, mod, m, args, batch, step = b["spec"], b["mod"], b["m"], b["args"], b["batch"], b["step"]
    tl = tl or NoTimeline()
    dev, abar = m.device, m.alphas_cumprod
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.mixed_precision == "bf16")
    phase = common.phase_of(step, args.phase_steps)
    l_dist, l_dmd, l_adv = (args.distill_weights[phase], args.dmd_weights[phase], args.adv_weights[phase])
    B = batch["pixel_values"].shape[0]

    def cfg_two_passes(x, t, cond, uncond, w):
        e_u = mod.denoise(teacher, x, t, uncond)
        e_c = mod.denoise(teacher, x, t, cond)
        return e_u + w * (e_c - e_u)

    def forward(prefix, grad):
        with torch.no_grad(), autocast:
            pixels = batch["pixel_values"].to(dev, non_blocking=True)
            z0 = m.vae.encode(pixels).latent_dist.sample().float() * m.vae.config.scaling_factor
            cond, uncond = spec.encode(mod, m, batch, args)
        tl.mark(prefix + DATA)
        m.teacher_sched.set_timesteps(args.num_teacher_steps, device=dev)
        ts = m.teacher_sched.timesteps
        k = common.sample_start_index(m.start_probs[phase])
        t = ts[k].expand(B)
        eps = torch.randn_like(z0)
        x_t = eps if k == 0 else common.renoise(z0, eps, t, abar)
        with torch.set_grad_enabled(grad), autocast:
            eps_s = mod.denoise(b["student"], x_t, t, cond)
        a = common.bcast(abar[t], x_t)
        x0_s = (x_t - (1 - a).sqrt() * eps_s) / a.sqrt()
        c_skip, c_out = (common.bcast(c, x_t) for c in common.lcm_boundary(t.float()))
        x_hat = c_skip * x_t + c_out * x0_s
        tl.mark(prefix + STUDENT_FWD)
        w = float(torch.empty(()).uniform_(args.guidance_min, args.guidance_max))
        with torch.no_grad(), autocast:
            x = x_t
            for tau in ts[k:]:
                x = m.teacher_sched.step(cfg_two_passes(x, tau.expand(B), cond, uncond, w), tau, x).prev_sample
        x_T = x.float()
        tl.mark(prefix + TEACHER)
        return z0, cond, uncond, x_hat, x_T

    def gan_inputs(x_hat, z0, x_T):
        s = torch.tensor(mod.GAN_TIMESTEPS, device=dev)[torch.randint(0, len(mod.GAN_TIMESTEPS), (B,), device=dev)]
        n = torch.randn_like(x_hat)
        real = x_T if args.teacher_as_real else z0
        return torch.cat([common.renoise(x_hat, n, s, abar), common.renoise(real, n, s, abar)]), torch.cat([s, s])

    # generator pass
    z0, cond, uncond, x_hat, x_T = forward("", grad=True)
    watch = Watcher(tl)
    watch(x_hat, BWD_REST)
    zero = torch.zeros((), device=dev)
    losses = dict(distill=zero, dmd=zero, adv=zero)
    with autocast:
        if l_dist > 0:
            decode = watch.decoder(m.decode)
            losses["distill"] = common.distill_loss(x_hat, x_T, args.distill_loss, decode, m.lpips)
        tl.mark(DISTILL_FWD)
        if l_dmd > 0:
            t2 = torch.randint(0, len(abar), (B,), device=dev)
            y = common.renoise(x_hat.detach(), torch.randn_like(x_hat), t2, abar)
            w2 = float(torch.empty(()).uniform_(args.guidance_min, args.guidance_max))
            with torch.no_grad():
                e_real = cfg_two_passes(y, t2, cond, uncond, w2)
                e_fake = mod.denoise(b["student"], y, t2, cond)
            losses["dmd"] = common.dmd_loss(x_hat, y, e_real, e_fake, abar[t2])
        tl.mark(DMD_FWD)
        if l_adv > 0:
            x_in, s2 = gan_inputs(x_hat, z0, x_T)
            watch(x_in, BWD_GAN)
            f_fake = spec.features(mod, m, teacher, x_in, s2, cat_cond(mod, cond, cond)).float().chunk(2)[0]
            m.disc.requires_grad_(False)
            losses["adv"] = common.gan_g_loss(m.disc(f_fake).float(), args.gan_loss)
        tl.mark(GAN_FWD)
    loss_g = l_dist * losses["distill"] + l_dmd * losses["dmd"] + l_adv * losses["adv"]
    b["opt_g"].zero_grad(set_to_none=True)
    loss_g.backward()
    m.disc.requires_grad_(True)
    tl.mark(BWD_STUDENT)
    ok_g = finite(loss_g)
    if ok_g:
        b["opt_g"].step()
    tl.mark(OPT)

    # discriminator pass: the whole forward again, nothing of the generator pass reused
    with torch.no_grad():
        z0, cond, uncond, x_hat, x_T = forward(D_PASS, grad=False)
        x_in, s2 = gan_inputs(x_hat, z0, x_T)
        with autocast:
            f_fake, f_real = spec.features(mod, m, teacher, x_in, s2,
                                           cat_cond(mod, cond, cond)).float().chunk(2)
    tl.mark(D_PASS + GAN_FWD)
    with autocast:
        logits_real, logits_fake = b["disc"](torch.cat([f_real, f_fake])).float().chunk(2)
        losses["disc"] = common.gan_d_loss(logits_real, logits_fake, args.gan_loss)
    b["opt_d"].zero_grad(set_to_none=True)
    losses["disc"].backward()
    tl.mark(DISC)
    ok_d = finite(losses["disc"])
    if ok_d:
        b["opt_d"].step()
    tl.mark(OPT)
    losses.update(loss_g=loss_g)
    return {k: v.detach() for k, v in losses.items()}, ok_g and ok_d, False


# ------------------------------------------------------------------------------------------------------
# the time of one step by part
#
# How: a timeline. Marks at known points of the step (entering and leaving functions the step calls,
# autograd hooks, a discriminator pre-hook) each close the segment since the previous mark, after a device
# synchronize; segments are summed by label. The parts therefore partition the instrumented step's wall
# time exactly, nothing is re-implemented, and the backbone scripts stay untouched: for our step the marks
# come from wrapping, for one step only, names the script looks up at call time (its module's
# teacher_solve and denoise, common's loss functions, m.features) and restoring them after. Backward is
# split by gradient hooks on the tensors where each loss branch joins the student's output (the features'
# input, the decoder's input, x_hat): the autograd engine runs the later-built branch first (GAN, then DMD,
# then distillation), then the student. A mark that never fires (a loss turned off, a script with other
# names) merges its part into the next one instead of failing. The syncs cost a little, so the breakdown
# comes from its own steps (--breakdown_steps), apart from the timed ones, and its total is shown beside
# the timed step.
# ------------------------------------------------------------------------------------------------------

DATA = "data: VAE encode + text encoders"
STUDENT_FWD = "student forward"
TEACHER = "teacher solve (K-k CFG steps)"
DISTILL_FWD = "distillation fwd (VAE decode + LPIPS)"
DMD_FWD = "DMD fwd (teacher CFG + fake score)"
GAN_FWD = "GAN fwd (teacher features + D)"
BWD_GAN = "backward: GAN branch (D + teacher features)"
BWD_DISTILL = "backward: distillation branch (LPIPS + VAE decoder)"
BWD_REST = "backward: DMD branch + glue"
BWD_STUDENT = "backward: student (denoiser + LoRA)"
DISC = "discriminator update fwd + bwd"
OPT = "optimizer (finite check + AdamW)"
D_PASS = "D pass: "  # prefix of the reference pattern's second forward
PART_ORDER = [DATA, STUDENT_FWD, TEACHER, DISTILL_FWD, DMD_FWD, GAN_FWD, BWD_GAN, BWD_DISTILL, BWD_REST, BWD_STUDENT,
              D_PASS + DATA, D_PASS + STUDENT_FWD, D_PASS + TEACHER, D_PASS + GAN_FWD, DISC, OPT]


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timeline:
    """Seconds per part and, on CUDA, the peak memory allocated during each part (where the step's peak is)."""

    def __init__(self, device):
        self.device, self.parts, self.peaks = device, {}, {}

    def start(self):
        synchronize(self.device)
        reset_peak_memory(self.device)
        self.last = time.perf_counter()

    def mark(self, label):
        synchronize(self.device)
        now = time.perf_counter()
        self.parts[label] = self.parts.get(label, 0.0) + now - self.last
        if self.device.type == "cuda":
            self.peaks[label] = max(self.peaks.get(label, 0.0), peak_memory_gib(self.device))
            reset_peak_memory(self.device)
        self.last = now


class Watcher:
    """Marks `label` when the gradient of a tensor has been computed (once per tensor)."""

    def __init__(self, tl):
        self.tl, self.seen = tl, {}  # id -> tensor: holding the tensor keeps a freed one's id from being reused

    def __call__(self, x, label):
        if isinstance(self.tl, Timeline) and torch.is_tensor(x) and x.requires_grad and id(x) not in self.seen:
            self.seen[id(x)] = x
            x.register_hook(lambda grad: self.tl.mark(label))

    def decoder(self, decode):
        def watched(z):
            self(z, BWD_DISTILL)
            return decode(z)
        return watched


@contextlib.contextmanager
def patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


@contextlib.contextmanager
def instrumented(b, tl):
    """Marks inside one of the script's own train_step calls (see the comment above)."""
    mod, m = b["mod"], b["m"]
    watch = Watcher(tl)

    def before(label, fn):
        def wrapped(*a, **k):
            tl.mark(label)
            return fn(*a, **k)
        return wrapped

    def after(label, fn, watch_first=None):
        def wrapped(*a, **k):
            if watch_first:
                watch(a[0] if a else None, watch_first)
            out = fn(*a, **k)
            tl.mark(label)
            return out
        return wrapped

    def around(fn):
        def wrapped(*a, **k):
            tl.mark(STUDENT_FWD)
            out = fn(*a, **k)
            tl.mark(TEACHER)
            return out
        return wrapped

    def distill(fn):
        def wrapped(x_hat, x_T, kind="lpips", decode=None, lpips_fn=None):
            watch(x_hat, BWD_REST)
            out = fn(x_hat, x_T, kind, decode and watch.decoder(decode), lpips_fn)
            tl.mark(DISTILL_FWD)
            return out
        return wrapped

    def grad_input(fn):  # the feature pass is the one denoiser call whose input carries a gradient
        def wrapped(net, x, *a, **k):
            if torch.is_grad_enabled():
                watch(x, BWD_GAN)
            return fn(net, x, *a, **k)
        return wrapped

    def disc_pre_hook(module, inputs):  # the D update's forward: D's parameters train again
        if any(p.requires_grad for p in module.parameters()):
            tl.mark(BWD_STUDENT)

    with contextlib.ExitStack() as stack:
        stack.enter_context(patched(common, "sample_start_index", before(DATA, common.sample_start_index)))
        stack.enter_context(patched(common, "distill_loss", distill(common.distill_loss)))
        for name in ("dmd_loss", "dmd_loss_flow"):  # epsilon and flow-matching (SD3) versions
            if hasattr(common, name):
                stack.enter_context(patched(common, name, after(DMD_FWD, getattr(common, name), BWD_REST)))
        stack.enter_context(patched(common, "gan_g_loss", after(GAN_FWD, common.gan_g_loss)))
        if hasattr(mod, "teacher_solve"):
            stack.enter_context(patched(mod, "teacher_solve", around(mod.teacher_solve)))
        if hasattr(mod, "denoise"):
            stack.enter_context(patched(mod, "denoise", grad_input(mod.denoise)))
        if hasattr(mod, "mid_features"):
            stack.enter_context(patched(mod, "mid_features", grad_input(mod.mid_features)))
        handle = m.disc.register_forward_pre_hook(disc_pre_hook)
        stack.callback(handle.remove)
        yield


# ------------------------------------------------------------------------------------------------------
# measuring
# ------------------------------------------------------------------------------------------------------

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


def measure(b, label, step_fn, breakdown_fn, opts, device):
    """Warm-up (and compilation), timed steps, peak memory, breakdown steps and one FLOP-counting step."""
    desc = f"{b['name']} {label}"
    t0 = time.perf_counter()
    for _ in tqdm(range(opts.warmup), desc=f"{desc} warm-up", leave=False, dynamic_ncols=True):
        step_fn()
    synchronize(device)
    warmup_s = time.perf_counter() - t0  # with --compile: mostly compilation
    peak_reset = reset_peak_memory(device)
    times, cpu_times, updated, losses = [], [], 0, {}
    for _ in tqdm(range(opts.steps), desc=f"{desc} timed", leave=False, dynamic_ncols=True):
        synchronize(device)
        t0, c0 = time.perf_counter(), time.process_time()
        losses, ok, _ = step_fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        updated += int(ok)
    peak = peak_memory_gib(device)
    sec = sum(times) / len(times)
    B = b["args"].batch_size
    # process CPU time beside the wall time: on a shared CPU machine the wall time also counts the waits
    out = dict(sec_per_update=sec, samples_per_sec=B / sec, step_times=times, updated=updated, warmup_s=warmup_s,
               cpu_sec_per_update=sum(cpu_times) / len(cpu_times),
               peak_mem_gib=peak, peak_mem_reset=peak_reset,
               losses={k: float(v) for k, v in losses.items() if v.numel() == 1})
    if opts.breakdown_steps:
        tl = Timeline(device)
        for _ in tqdm(range(opts.breakdown_steps), desc=f"{desc} breakdown", leave=False, dynamic_ncols=True):
            breakdown_fn(tl)
        n = opts.breakdown_steps
        parts = {k: v / n for k, v in sorted(tl.parts.items(), key=lambda kv: part_rank(kv[0]))}
        out.update(breakdown=parts, breakdown_total_s=sum(parts.values()))
        if tl.peaks:
            out["breakdown_peak_mem_gib"] = {k: tl.peaks[k] for k in parts if k in tl.peaks}
    if opts.flops:
        from torch.utils.flop_counter import FlopCounterMode
        with torch.compiler.set_stance("force_eager"), FlopCounterMode(display=False) as counter:
            step_fn()
        out["flops_per_update"] = counter.get_total_flops()
        out["tflops_per_s"] = out["flops_per_update"] / sec / 1e12
        if opts.peak_tflops:
            out["mfu"] = out["tflops_per_s"] / opts.peak_tflops
    synchronize(device)
    return out


def part_rank(label):
    return PART_ORDER.index(label) if label in PART_ORDER else len(PART_ORDER)


def short_error(e):
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]


def run_backbone(name, opts, device, log, save, res):
    """Our step, then the reference pattern on the same models, into `res`; saved after each."""
    b = build_step(name, opts, device, log)
    b["name"] = name
    args = b["args"]
    res.update(script=b["spec"].script + ".py", resolution=args.resolution, batch_size=args.batch_size,
               mixed_precision=args.mixed_precision, compile=args.compile,
               gradient_checkpointing=args.gradient_checkpointing, distill_loss=args.distill_loss,
               K=b["K"], start_index=b["k"], solver_steps=b["K"] - b["k"], phase=opts.phase,
               denoiser_params_m=b["params"] / 1e6, notes=list(b["spec"].notes))
    mod, m = b["mod"], b["m"]

    def ours():
        return optimizer_steps(b, mod.train_step(m, b["student"], b["disc"], b["batch"], b["step"], args))

    def ours_instrumented(tl):
        with instrumented(b, tl):
            tl.start()
            losses = mod.train_step(m, b["student"], b["disc"], b["batch"], b["step"], args)
            tl.mark(DISC)
            optimizer_steps(b, losses)
            tl.mark(OPT)

    res["ours"] = measure(b, "ours", ours, ours_instrumented, opts, device)
    save(res)
    if args.compile and opts.eager_too:  # what compiling buys: the same step on the same models, eager
        with torch.compiler.set_stance("force_eager"):
            x = measure(b, "ours eager", ours, ours_instrumented, argparse.Namespace(**dict(vars(opts), flops=False)),
                        device)
        flops = res["ours"].get("flops_per_update")  # the same step's count
        if flops:
            x.update(flops_per_update=flops, tflops_per_s=flops / x["sec_per_update"] / 1e12)
            if opts.peak_tflops:
                x["mfu"] = x["tflops_per_s"] / opts.peak_tflops
        res.update(ours_eager=x, compile_speedup=x["sec_per_update"] / res["ours"]["sec_per_update"])
        save(res)
    if opts.reference and b["spec"].encode is None:
        res["reference"] = dict(skipped=f"no reference pattern for {name} (flow matching)")
    elif opts.reference:
        # --reference_compile no with --compile: the reference runs wholly eager, as the original code did
        eager_ref = args.compile and not opts.reference_compile
        try:
            teacher = make_reference_teacher(b)
            if args.compile and not eager_ref:
                compile_blocks(teacher, mod.COMPILE_BLOCKS)
            res["reference_compiled"] = args.compile and not eager_ref

            def ref():
                return reference_step(b, teacher)

            def ref_instrumented(tl):
                tl.start()
                reference_step(b, teacher, tl)

            with torch.compiler.set_stance("force_eager" if eager_ref else "default"):
                res["reference"] = measure(b, "reference", ref, ref_instrumented, opts, device)
            ours_, ref_ = res["ours"], res["reference"]
            res["speedup"] = ref_["sec_per_update"] / ours_["sec_per_update"]
            res["memory_ratio"] = ref_["peak_mem_gib"] / ours_["peak_mem_gib"]
        except Exception as e:  # e.g. out of memory: keep our step's numbers
            res["reference"] = dict(error=short_error(e))
            log.info(f"{name} reference: failed: {res['reference']['error']}")
            traceback.print_exc()
        teacher = None
    save(res)
    del b, m
    return res


# ------------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------------

def device_info(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def detect_peak_tflops(device, override):
    if override:
        return override, "given with --peak_tflops"
    if device.type != "cuda":
        return None, "CPU: no MFU"
    name = torch.cuda.get_device_name(device).upper()
    if "H100" in name and "PCIE" in name:
        return 756.0, f"{name}: H100 PCIe dense bf16"
    if "H100" in name or "H200" in name:
        return 989.0, f"{name}: H100 SXM / H200 dense bf16"
    return None, f"{name}: unknown peak, pass --peak_tflops for MFU"


def versions():
    from importlib.metadata import PackageNotFoundError, version
    out = {"python": platform.python_version()}
    for pkg in ("torch", "diffusers", "transformers", "peft", "lpips"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    out["torch"], out["cuda"] = torch.__version__, torch.version.cuda  # the build (+cu130, +cpu) too
    return out


def fmt(x, spec=".3g"):
    return "-" if x is None else format(x, spec)


def markdown(report):
    meta = report["meta"]
    v = meta["versions"]
    cpu = meta["device"] == "cpu"
    lines = [f"### Training-step speed: {meta['device_name']}", "",
             f"{meta['date']}; torch {v['torch']}, diffusers {v['diffusers']}, transformers {v['transformers']}, "
             f"peft {v['peft']}; `{meta['command']}`", "",
             "| backbone | size | res | batch | solver steps | precision | step | s / update | samples/s | "
             "peak mem GiB | TFLOP / update | MFU | speed-up | mem ratio |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        if "error" in r and "ours" not in r:
            lines.append(f"| {r['backbone']} | {r['size']} | | | | | error: {r['error']} | | | | | | | |")
            continue
        for variant in ("ours", "ours_eager", "reference"):
            x = r.get(variant)
            if not x:
                continue
            compiled = r["compile"] and (variant == "ours" or
                                         variant == "reference" and r.get("reference_compiled", True))
            prec = r["mixed_precision"] + (" +compile" if compiled else "") + (
                " +ckpt" if r["gradient_checkpointing"] else "")
            head = (f"| {r['backbone']} | {r['size']} | {r['resolution']} | {r['batch_size']} | "
                    f"{r['solver_steps']} of {r['K']} | {prec} |")
            if "sec_per_update" not in x:
                lines.append(f"{head} {variant} | {x.get('skipped') or x.get('error')} | | | | | | |")
                continue
            flops = x.get("flops_per_update")
            extra = (f" {fmt(r.get('speedup'), '.2f')}x | {fmt(r.get('memory_ratio'), '.2f')}x |"
                     if variant == "ours" and "speedup" in r else " | |")
            if variant == "ours_eager":
                extra = f" compile: {r['compile_speedup']:.2f}x | |"
            sec = f"{x['sec_per_update']:.4g}" + (f" (CPU {x['cpu_sec_per_update']:.3g})" if cpu else "")
            lines.append(f"{head} {variant.replace('_', ' ')} | {sec} | {x['samples_per_sec']:.3g} | "
                         f"{x['peak_mem_gib']:.2f} | {fmt(flops and flops / 1e12)} | "
                         f"{fmt(x.get('mfu') and 100 * x['mfu'], '.1f')}{'%' if x.get('mfu') else ''} |{extra}")
    for r in report["results"]:
        cols = [(v, r[v]) for v in ("ours", "ours_eager", "reference") if "breakdown" in (r.get(v) or {})]
        if not cols or cols[0][0] != "ours":
            continue
        labels = sorted(set().union(*(x["breakdown"] for _, x in cols)), key=part_rank)
        mem = ", peak memory allocated during the part" if "breakdown_peak_mem_gib" in cols[0][1] else ""
        lines += ["", f"One step by part, {r['backbone']} ({r['size']}, {r['resolution']} px, batch {r['batch_size']}), "
                  f"seconds (share of the instrumented step){mem}:", "",
                  "| part | " + " | ".join(v.replace("_", " ") for v, _ in cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for lab in labels:
            cells = []
            for _, x in cols:
                sec = x["breakdown"].get(lab)
                peak = x.get("breakdown_peak_mem_gib", {}).get(lab)
                cells.append("" if sec is None else f"{sec:.4g} ({100 * sec / x['breakdown_total_s']:.0f}%)" +
                             ("" if peak is None else f", peak {peak:.1f} GiB"))
            lines.append(f"| {lab} | " + " | ".join(cells) + " |")
        totals = (f"{x['breakdown_total_s']:.4g} (timed step {x['sec_per_update']:.4g})" for _, x in cols)
        lines.append("| **total** | " + " | ".join(totals) + " |")
    lines += ["", "Notes:"] + [f"- {n}" for n in meta["notes"]]
    for r in report["results"]:
        lines += [f"- {r['backbone']}: {n}" for n in r.get("notes", [])]
        if "error" in r:
            lines.append(f"- {r['backbone']}: error: {r['error']}")
    return "\n".join(lines) + "\n"


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
    a("--breakdown_steps", type=int, default=1, help="instrumented steps for the by-part breakdown (0: none)")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--mixed_precision", default=None, choices=["bf16", "no"], help="default: bf16 on CUDA, no on CPU")
    a("--compile", action="store_true", help="the script's --compile: its repeated blocks compiled (both patterns)")
    a("--gradient_checkpointing", action="store_true", help="the scripts' flag")
    a("--distill_loss", default="lpips", choices=["lpips", "l2"], help="lpips: VGG with a random trunk")
    a("--no_reference", dest="reference", action="store_false", help="skip the reference pattern")
    a("--eager_too", action="store_true", help="with --compile: time our step eager too, on the same models")
    a("--reference_compile", default="yes", choices=["yes", "no"],
      help="with --compile: compile the reference too (yes), or run it eager as the original code (no)")
    a("--no_flops", dest="flops", action="store_false", help="skip the FLOP-counting step")
    a("--peak_tflops", type=float, default=None, help="device peak for MFU; default: detected (H100/H200 989)")
    a("--seed", type=int, default=0)
    a("--out", default=None, help="markdown file (JSON beside it); default bench/results/speed_<device>.md")
    a("--table", default=None, metavar="JSON", help="print the markdown of a saved JSON report and exit")
    opts = p.parse_args(argv)
    opts.reference_compile = opts.reference_compile == "yes"
    if opts.steps < 1 or opts.warmup < 0 or opts.breakdown_steps < 0:
        p.error("--steps must be >= 1, --warmup and --breakdown_steps >= 0")
    if opts.compile and opts.warmup < 1:
        p.error("--compile needs --warmup >= 1 (the first step compiles)")
    if not opts.compile and (opts.eager_too or not opts.reference_compile):
        p.error("--eager_too and --reference_compile no compare against a compiled step: add --compile")
    return opts


def main(argv=None):
    opts = parse_args(argv)
    if opts.table:
        with open(opts.table) as f:
            print(markdown(json.load(f)), end="")
        return None
    device = torch.device(opts.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    opts.mixed_precision = opts.mixed_precision or ("bf16" if device.type == "cuda" else "no")
    names = opts.backbone
    if "all" in names:
        names = [n for n in BACKBONES if os.path.exists(os.path.join(ROOT, SPECS[n].script + ".py"))]
    opts.peak_tflops, peak_source = detect_peak_tflops(device, opts.peak_tflops)
    out = opts.out or os.path.join(ROOT, "bench", "results", f"speed_{device.type}.md")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    logging.basicConfig(format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S", level=logging.INFO)
    log = logging.getLogger("speed")
    notes = ["our step: the script's own train_step; reference: the original code's pattern (fp32 teacher copy, "
             "cond/uncond as two passes, the whole forward again for the D update), same models and losses",
             f"phase {opts.phase} loss weights; fixed teacher start index (solver steps shown)",
             "LPIPS: VGG16 with a random trunk (pnet_rand), the real one's compute" if opts.distill_loss == "lpips"
             else "distillation loss: l2 (no decode)",
             "synthetic data and byte-level tokenizers; random weights",
             f"peak memory: {'torch.cuda.max_memory_allocated' if device.type == 'cuda' else 'peak RSS (getrusage), reset before each pattern'}",
             f"FLOPs: torch.utils.flop_counter over one eager step; MFU vs {opts.peak_tflops} TFLOP/s ({peak_source}; "
             f"{PEAK_NOTE})"]
    if device.type == "cpu":
        notes.append("CPU: s / update is wall time; (CPU ...) is the process's CPU time per update, which a busy "
                     "shared machine does not inflate")
    report = dict(meta=dict(date=datetime.datetime.now().isoformat(timespec="seconds"), device=str(device),
                            device_name=device_info(device), versions=versions(), peak_tflops=opts.peak_tflops,
                            peak_source=peak_source, settings=vars(opts),
                            command="python bench/speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                            notes=notes), results=[])

    def save(res=None):
        if res is not None and not any(r is res for r in report["results"]):
            report["results"].append(res)
        with open(os.path.splitext(out)[0] + ".json", "w") as f:
            json.dump(report, f, indent=1)
        with open(out, "w") as f:
            f.write(markdown(report))

    failed = []
    for name in names:
        res = dict(backbone=name, size=opts.size)
        try:
            run_backbone(name, opts, device, log, save, res)
        except Exception as e:  # one backbone's failure (e.g. out of memory) must not lose the others
            res["error"] = short_error(e)
            save(res)
            log.info(f"{name}: failed: {res['error']}")
            traceback.print_exc()
        finally:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if "error" in res or "error" in res.get("reference", {}):
            failed.append(name)
        save()
    text = markdown(report)
    print(text)
    print(f"written: {out} and {os.path.splitext(out)[0] + '.json'}")
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")
    return report


if __name__ == "__main__":
    main()
