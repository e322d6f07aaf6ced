"""Models in memory for bench/speed.py and the tests: the configs (tiny: the test suite's; real: the
released architectures, random weights), byte-level tokenizers with the real sequence lengths, and a script's
own build() fed from memory instead of the Hub."""
import contextlib

import torch

import common

class Encoding(dict):
    __getattr__ = dict.__getitem__


class ByteTokenizer:
    """Byte-level ids with a model's special tokens, padded to max_length as the scripts ask."""

    def __init__(self, vocab_size, max_length, bos=None, eos=1, pad=0, first_id=3):
        self.vocab_size, self.model_max_length = vocab_size, max_length
        self.bos, self.eos, self.pad, self.first_id = bos, eos, pad, first_id

    def __call__(self, prompts, max_length=None, **unused):
        n, head = max_length or self.model_max_length, [] if self.bos is None else [self.bos]
        span = (self.vocab_size if self.bos is None else self.bos) - self.first_id
        rows = [head + [self.first_id + c % span for c in p.encode()][: n - 1 - len(head)] + [self.eos]
                for p in ([prompts] if isinstance(prompts, str) else prompts)]
        return Encoding(input_ids=torch.tensor([r + [self.pad] * (n - len(r)) for r in rows]),
                        attention_mask=torch.tensor([[1] * len(r) + [0] * (n - len(r)) for r in rows]))


def clip_tokenizer(vocab_size):  # start and end of text are the two highest ids, the end token pads
    return ByteTokenizer(vocab_size, 77, bos=vocab_size - 2, eos=vocab_size - 1, pad=vocab_size - 1, first_id=0)


def t5_tokenizer(vocab_size):
    return ByteTokenizer(vocab_size, 512, bos=None, eos=1, pad=0, first_id=3)


SCALED_LINEAR = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                     steps_offset=1, prediction_type="epsilon")  # SD1.5 and SDXL schedulers
LINEAR = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
              prediction_type="epsilon")  # PixArt-alpha
FLOW_SHIFT3 = dict(num_train_timesteps=1000, shift=3.0)  # SD3
# FLUX.1-dev's scheduler config: the resolution-dependent shift (mu 0.5 at 256 tokens to 1.15 at 4096)
FLOW_FLUX = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                 base_image_seq_len=256, max_image_seq_len=4096)

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
    ("flux", "tiny"): ("FluxTransformer2DModel", dict(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))),
    ("flux", "real"): ("FluxTransformer2DModel", dict(  # FLUX.1-dev
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56))),
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
        elif backbone == "flux":  # CLIP-L (its pooled output) and T5-XXL (width 4096: the joint width)
            c1, c2 = clip_config(size, hidden_act="gelu") if tiny else clip_config(size), t5_config(size)
            vae = dict(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                       use_post_quant_conv=False)
            parts = dict(tokenizer=clip_tokenizer(c1["vocab_size"]), tokenizer_2=t5_tokenizer(c2["vocab_size"]),
                         text_encoder=CLIPTextModel(CLIPTextConfig(**c1)),
                         text_encoder_2=T5EncoderModel(T5Config(**c2)),
                         vae=AutoencoderKL(**(tiny_vae(**vae) if tiny else real_vae(**dict(vae, sample_size=1024)))),
                         transformer=build_denoiser(backbone, size), scheduler=dict(FLOW_FLUX))
    return parts


class FromMemory:
    """Stands in for a diffusers/transformers class in a script's namespace while its build() runs:
    from_pretrained(path, subfolder=...) returns the in-memory object for that subfolder (or path) in the
    requested dtype, load_config its config; everything else (from_config ...) is the real class's."""

    def __init__(self, real, parts):
        self.real, self.parts = real, parts

    def _get(self, path, subfolder):
        key = subfolder or path
        if key not in self.parts:
            raise KeyError(f"bench/models.py builds no {key!r} for {self.real.__name__}; add it to build_parts")
        return self.parts[key]

    def from_pretrained(self, path=None, subfolder=None, dtype=None, torch_dtype=None, **unused):
        obj, dtype = self._get(path, subfolder), dtype or torch_dtype
        if isinstance(obj, dict):
            return self.real.from_config(obj)
        return obj.to(dtype) if dtype is not None and isinstance(obj, torch.nn.Module) else obj

    def load_config(self, path=None, subfolder=None, **unused):
        obj = self._get(path, subfolder)
        return dict(obj) if isinstance(obj, dict) else dict(obj.config)

    def __getattr__(self, name):
        return getattr(self.real, name)


@contextlib.contextmanager
def models_from_memory(mod, parts):
    """The script's diffusers/transformers classes swapped for FromMemory stand-ins, and LPIPS for the
    offline one, while its own build() runs; restored afterwards."""
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


def make_lpips():
    """LPIPS-VGG with a random VGG16 trunk and the package's real linear heads: the real one's compute."""
    import lpips
    return lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
