"""The <script>_comfyui.safetensors export that every script writes beside its diffusers / PEFT export: the
kohya-style file (per-module lora_down, lora_up and alpha) that ComfyUI, AUTOMATIC1111 and Forge load.

Each backbone trains once, for one update with alpha != rank (4 and 8, scale 2) and a high learning rate, so
that the LoRA B matrices are non-zero and a wrong scale would show. The UNet files are then loaded with
diffusers' own kohya loader and must reproduce the trained student; diffusers has no loader for the SD3 and
PixArt forms (SD3's refuses the .alpha keys), so those files are merged by hand (W + alpha / r * up @ down,
as ComfyUI does) and compared with the student's merged weights and outputs. Finally the key names are checked
on the real SD1.5, SDXL, PixArt-alpha and SD3-medium architectures, built on the meta device."""
import importlib
import os
import re

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file
from conftest import SCRIPTS
from models import build_denoiser  # bench/models.py (conftest puts bench/ on sys.path)

RANK, ALPHA = 4, 8.0

UNETS = ["flash_sd", "flash_sdxl", "flash_adapter"]
TRANSFORMERS = ["flash_pixart", "flash_sd3", "flash_flux"]


def comfy_file(name):
    return f"{name}_comfyui.safetensors"


def train_argv(model, extra, shards, out):
    """One update in phase 1 (distillation, DMD and GAN terms on), alpha != rank, a high learning rate."""
    return ["--model", model, *extra, "--shards", *shards, "--output_dir", str(out), "--resolution", "32",
            "--batch_size", "2", "--phase_steps", "0", "1", "0", "0", "--num_teacher_steps", "4",
            "--mixed_precision", "no", "--distill_loss", "l2", "--num_workers", "1", "--lora_rank", str(RANK),
            "--lora_alpha", str(int(ALPHA)), "--lr", "3e-3", "--lr_disc", "3e-3", "--log_every", "1",
            "--sample_every", "100", "--checkpoint_every", "100", "--validation_prompts", "a red square"]


@pytest.fixture(scope="module")
def runs(request, shards, tmp_path_factory):
    """One tiny training per script, on first use: name -> (module, model folder, output folder, denoiser)."""
    done = {}

    def get(name):
        if name not in done:
            fixture, extra = SCRIPTS[name]
            model = request.getfixturevalue(fixture)
            mod = importlib.import_module(name)
            out = tmp_path_factory.mktemp(name) / "run"
            with pytest.MonkeyPatch.context() as mp:  # the final sample grid (tested elsewhere) is most of the time
                mp.setattr(mod, "sample_grid", lambda m, args, step: "(not drawn here)")
                m, step = mod.main(train_argv(model, [e.format(model=model) for e in extra], shards, out))
            assert step == 1
            done[name] = mod, model, out, m.denoiser
        return done[name]
    return get


def lora_modules(net):
    """(diffusers module path, PEFT LoRA layer) for every LoRA-trained module; PixArt's PeftModel wrapper
    prefix is dropped."""
    return [(name.removeprefix("base_model.model."), mod) for name, mod in net.named_modules()
            if hasattr(mod, "lora_A") and "default" in mod.lora_A]


def comfy_key(name, path):
    return "lora_unet_" + path.replace(".", "_") if name in UNETS else "transformer." + path


# ---------------------------------------------------------------------------------------------------------
# the file, beside the existing exports, in the output folder and the final checkpoint
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_the_file_is_written_with_every_export_and_carries_the_trained_alpha(runs, name):
    mod, _, out, net = runs(name)
    old = ["adapter_config.json", "adapter_model.safetensors"] if name == "flash_pixart" else \
        ["pytorch_lora_weights.safetensors"]
    ckpt = out / "checkpoints" / "step_000001"
    for folder in (out, ckpt):
        assert {*old, comfy_file(name)} <= set(os.listdir(folder)), folder
    sd = load_file(str(out / comfy_file(name)))
    assert sd.keys() == load_file(str(ckpt / comfy_file(name))).keys()
    expected = mod.comfyui_state_dict(net)
    assert sd.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(sd[k], v), k
    # the weights keep the diffusers / PEFT export's dtype (fp32, as trained)
    with safe_open(str(out / old[-1]), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}
    modules = lora_modules(net)
    assert modules and len(sd) == 3 * len(modules)
    nonzero = 0
    for path, layer in modules:
        key = comfy_key(name, path)
        down, up, alpha = sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"], sd[f"{key}.alpha"]
        assert torch.equal(down, layer.lora_A["default"].weight.detach())
        assert torch.equal(up, layer.lora_B["default"].weight.detach())
        assert down.shape[0] == RANK and up.shape[1] == RANK and down.dtype == up.dtype == torch.float32
        assert alpha.shape == () and alpha.item() == ALPHA  # not the rank, as diffusers' kohya converter writes
        nonzero += bool(up.abs().max() > 0)
    assert nonzero > len(modules) // 2  # one update at lr 3e-3 moved the B matrices away from 0


# ---------------------------------------------------------------------------------------------------------
# UNets: diffusers' own kohya loader reads the file and gives back the trained student
# ---------------------------------------------------------------------------------------------------------

def unet_inputs(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    x, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([999, 499])
    kw = dict(encoder_hidden_states=torch.randn(2, 77, cfg.cross_attention_dim, generator=g))
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kw["added_cond_kwargs"] = dict(text_embeds=torch.randn(2, pooled, generator=g),
                                       time_ids=torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2))
    return x, t, kw


@pytest.mark.parametrize("name", UNETS)
def test_unet_file_loads_with_diffusers_kohya_loader_as_the_trained_student(runs, name):
    import diffusers
    _, model, out, unet = runs(name)
    pipe_cls = {"flash_sd": "StableDiffusionPipeline", "flash_sdxl": "StableDiffusionXLPipeline",
                "flash_adapter": "StableDiffusionXLAdapterPipeline"}[name]
    extra = dict(safety_checker=None, requires_safety_checker=False) if name == "flash_sd" else {}
    pipe = getattr(diffusers, pipe_cls).from_pretrained(model, **extra)
    x, t, kw = unet_inputs(unet)
    with torch.no_grad():
        base = pipe.unet(x, t, **kw).sample
        pipe.load_lora_weights(str(out), weight_name=comfy_file(name))
        loaded = pipe.unet(x, t, **kw).sample
        student = unet(x, t, **kw).sample
    assert (loaded - base).abs().max() > 1e-4  # the LoRA does something
    torch.testing.assert_close(loaded, student, rtol=1e-5, atol=1e-5)  # and, scale included, it is the student
    # the folder, without weight_name, still loads the diffusers file (which the loader prefers by name)
    pipe = getattr(diffusers, pipe_cls).from_pretrained(model, **extra)
    state, alphas = pipe.lora_state_dict(str(out))
    assert alphas is None and not any("lora_unet_" in k or k.endswith(".alpha") for k in state)  # not the kohya file
    pipe.load_lora_weights(str(out))
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, t, **kw).sample, student, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# PixArt and SD3: merged as ComfyUI merges (W + alpha / r * up @ down), the file is the trained student
# ---------------------------------------------------------------------------------------------------------

def merge(sd, key, weight):
    down, up, alpha = sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"], sd[f"{key}.alpha"].item()
    return weight + alpha / down.shape[0] * (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)


def transformer_inputs(net, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = net.config
    x, t = torch.randn(2, cfg.in_channels, 16, 16, generator=g), torch.tensor([999, 499])
    if "caption_channels" in cfg:  # PixArt
        text = torch.randn(2, 8, cfg.caption_channels, generator=g)
        return dict(hidden_states=x, timestep=t, encoder_hidden_states=text,
                    added_cond_kwargs=dict(resolution=None, aspect_ratio=None))
    text = torch.randn(2, 8, cfg.joint_attention_dim, generator=g)
    if cfg.get("guidance_embeds"):  # FLUX: 2x2-packed tokens of a 16x16 latent, their ids, the guidance
        import flash_flux
        return dict(hidden_states=flash_flux.pack(torch.randn(2, 16, 16, 16, generator=g)), timestep=t / 1000,
                    guidance=torch.tensor([3.5, 2.0]), encoder_hidden_states=text, img_ids=flash_flux.image_ids(
                        16, 16, "cpu"), txt_ids=torch.zeros(8, 3),
                    pooled_projections=torch.randn(2, cfg.pooled_projection_dim, generator=g))
    return dict(hidden_states=x, timestep=t, encoder_hidden_states=text,
                pooled_projections=torch.randn(2, cfg.pooled_projection_dim, generator=g))


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_transformer_file_merged_into_the_base_model_is_the_trained_student(runs, name):
    import diffusers
    _, model, out, net = runs(name)
    cls = {"flash_pixart": "PixArtTransformer2DModel", "flash_sd3": "SD3Transformer2DModel",
           "flash_flux": "FluxTransformer2DModel"}[name]
    base = getattr(diffusers, cls).from_pretrained(model, subfolder="transformer")
    weights = base.state_dict()
    sd = load_file(str(out / comfy_file(name)))
    merged, moved = dict(weights), 0
    for path, layer in lora_modules(net):
        w = weights[f"{path}.weight"]
        assert torch.equal(layer.base_layer.weight.detach(), w)  # the teacher is the base model
        merged[f"{path}.weight"] = merge(sd, comfy_key(name, path), w)
        student = w + layer.get_delta_weight("default").detach()  # PEFT's merge, with its scale alpha / r
        assert merged[f"{path}.weight"].shape == w.shape
        torch.testing.assert_close(merged[f"{path}.weight"], student, rtol=1e-5, atol=1e-6)
        moved += bool((student - w).abs().max() > 0)
    assert moved > 0
    if name != "flash_flux":  # the patch conv (FLUX has none)
        assert any(sd[k].dim() == 4 for k in sd if k.endswith("pos_embed.proj.lora_down.weight"))
    # the whole merged model runs as the student does
    kw = transformer_inputs(base)
    with torch.no_grad():
        before = base(**kw).sample
        base.load_state_dict(merged)
        after, student = base(**kw).sample, net(**kw).sample
    assert (after - before).abs().max() > 1e-5
    torch.testing.assert_close(after, student, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# the real architectures (meta device): every LoRA module has its three keys, in the form ComfyUI maps
# ---------------------------------------------------------------------------------------------------------

# the diffusers module paths that ComfyUI's diffusers-to-native key maps (comfy/utils.py: unet_to_diffusers,
# pixart_to_diffusers, mmdit_to_diffusers, flux_to_diffusers) cover, restricted to the layers these scripts' LoRA
# can reach
BLOCK = r"transformer_blocks\.\d+\."
COMFY_MAPPED = {
    "unet": re.compile(r"(down_blocks\.\d+\.attentions\.\d+|mid_block\.attentions\.0|up_blocks\.\d+\.attentions\.\d+)"
                       r"\.transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)"),
    "pixart": re.compile(rf"{BLOCK}(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.0\.proj|ff\.net\.2)"
                         r"|pos_embed\.proj|proj_out|adaln_single\.linear|caption_projection\.linear_[12]"
                         r"|adaln_single\.emb\.(timestep|resolution|aspect_ratio)_embedder\.linear_[12]"),
    "sd3": re.compile(rf"{BLOCK}(attn\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.0\.proj|ff\.net\.2|ff_context\.net\.0\.proj"
                      r"|ff_context\.net\.2|norm1\.linear|norm1_context\.linear)"
                      r"|pos_embed\.proj|proj_out|norm_out\.linear"
                      r"|time_text_embed\.(timestep|text)_embedder\.linear_[12]"),
    "flux": re.compile(rf"{BLOCK}attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
                       rf"|single_{BLOCK}(attn\.to_q|attn\.to_k|attn\.to_v|proj_mlp|proj_out)"),
}


@pytest.mark.parametrize("name, backbone", [("flash_sd", "sd"), ("flash_sdxl", "sdxl"), ("flash_adapter", "adapter"),
                                            ("flash_pixart", "pixart"), ("flash_sd3", "sd3"), ("flash_flux", "flux")])
def test_every_lora_module_of_the_real_architecture_has_its_keys(name, backbone):
    mod = importlib.import_module(name)
    config = LoraConfig(r=mod.LORA_RANK, lora_alpha=mod.LORA_ALPHA, init_lora_weights=mod.LORA_INIT,
                        target_modules=mod.LORA_TARGETS)
    with torch.device("meta"):
        net = build_denoiser(backbone, "real").requires_grad_(False)
        if name == "flash_pixart":  # as the script builds it: PixArt has no diffusers LoRA loader, so a PeftModel
            net = get_peft_model(net, config)
        else:
            net.add_adapter(config)
    sd = mod.comfyui_state_dict(net)  # off the meta context: the alpha scalars are real tensors
    modules = lora_modules(net)
    mapped = COMFY_MAPPED["unet" if name in UNETS else backbone]
    expected = set()
    for path, layer in modules:
        key = comfy_key(name, path)
        expected |= {f"{key}.lora_down.weight", f"{key}.lora_up.weight", f"{key}.alpha"}
        assert sd[f"{key}.lora_down.weight"].shape == layer.lora_A["default"].weight.shape
        assert sd[f"{key}.lora_up.weight"].shape == layer.lora_B["default"].weight.shape
        assert sd[f"{key}.alpha"].item() == mod.LORA_ALPHA
        assert mapped.fullmatch(path), path
    assert set(sd) == expected
    if name in UNETS:  # kohya names: the diffusers path with every . as _
        assert all(k.startswith("lora_unet_") and "." not in k.split(".")[0] for k in sd)
    # SD1.5 / SDXL: the 4 projections of both attentions of 16 / 70 transformer blocks; PixArt: 10 in each of 28
    # blocks + 11 outside; SD3: 9 in each of 24 blocks (the last has no ff_context) - 1 + 7 outside; FLUX: 8 in each
    # of 19 double blocks, 5 in each of 38 single blocks
    assert len(modules) == {"sd": 128, "sdxl": 560, "adapter": 560, "pixart": 291, "sd3": 222, "flux": 342}[backbone]
    if backbone == "pixart":
        assert {"pos_embed.proj", "proj_out", "adaln_single.linear", "caption_projection.linear_1",
                "adaln_single.emb.resolution_embedder.linear_1"} <= {p for p, _ in modules}
        assert sd["transformer.pos_embed.proj.lora_down.weight"].dim() == 4  # the patch conv keeps 4-D shapes
    if backbone == "sd3":
        assert {"pos_embed.proj", "proj_out", "norm_out.linear", "time_text_embed.text_embedder.linear_2",
                "transformer_blocks.23.norm1_context.linear"} <= {p for p, _ in modules}
