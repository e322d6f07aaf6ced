"""Single-file checkpoints (--model file.safetensors --base_model FOLDER) in the UNet scripts: converted once into
OUTPUT_DIR/model with diffusers' from_single_file, trained from there, resumed without converting again, and the
exported LoRA loads onto the same single file in diffusers. diffusers writes no single files, so the tests write
them: the original (LDM) layout of tiny models' UNet, VAE and text encoders (CLIP-L; SDXL's second in OpenCLIP's
layout), by the inverse of diffusers' own mapping (diffusers.loaders.single_file_utils)."""
import os

import pytest
import torch
from conftest import byte_clip_tokenizer, metrics
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING
from safetensors.torch import save_file

import common
import flash_adapter
import flash_sd
import flash_sdxl

RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
          ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))
VAE_ATTENTION = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))


def ldm_unet_key(key, config):
    """The original layout's name of a diffusers UNet parameter (what convert_ldm_unet_checkpoint undoes)."""
    top = {**DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"], **DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"]}
    if key in top:
        return top[key]
    part, n = key.split("."), config["layers_per_block"] + 1
    if part[0] == "mid_block":
        kind, j, rest = part[1], int(part[2]), ".".join(part[3:])
        return f"middle_block.{2 * j}.{resnet(rest)}" if kind == "resnets" else f"middle_block.1.{rest}"
    b, kind, j, rest = int(part[1]), part[2], int(part[3]), ".".join(part[4:])
    if part[0] == "down_blocks":
        block = {"resnets": f"{1 + b * n + j}.0.{resnet(rest)}", "attentions": f"{1 + b * n + j}.1.{rest}",
                 "downsamplers": f"{(b + 1) * n}.0.op.{rest.removeprefix('conv.')}"}[kind]
        return f"input_blocks.{block}"
    attention = config["up_block_types"][b].startswith("CrossAttn")  # its upsampler comes after the attention
    block = {"resnets": f"{b * n + j}.0.{resnet(rest)}", "attentions": f"{b * n + j}.1.{rest}",
             "upsamplers": f"{b * n + n - 1}.{2 if attention else 1}.{rest}"}[kind]
    return f"output_blocks.{block}"


def resnet(rest):
    for new, old in RESNET:
        rest = rest.replace(f"{new}.", f"{old}.")
    return rest


def ldm_vae_key(key, config):
    """The original layout's name of a diffusers VAE parameter (what convert_ldm_vae_checkpoint undoes)."""
    top = {d: o for d, o in DIFFUSERS_TO_LDM_MAPPING["vae"].items()}
    if key in top:
        return top[key]
    coder, part = key.split(".")[0], key.split(".")[1:]
    if part[0] == "mid_block":
        rest = ".".join(part[3:])
        if part[1] == "attentions":
            for new, old in VAE_ATTENTION:
                rest = rest.replace(f"{new}.", f"{old}.")
            return f"{coder}.mid.attn_1.{rest}"
        return f"{coder}.mid.block_{int(part[2]) + 1}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
    i = int(part[1]) if coder == "encoder" else len(config["up_block_types"]) - 1 - int(part[1])
    level = "down" if coder == "encoder" else "up"
    if part[2] == "resnets":
        return f"{coder}.{level}.{i}.block.{part[3]}.{'.'.join(part[4:]).replace('conv_shortcut', 'nin_shortcut')}"
    return f"{coder}.{level}.{i}.{level}sample.{'.'.join(part[4:])}"  # downsamplers.0.conv.* -> downsample.conv.*


def open_clip_state(folder, prefix):
    """text_encoder_2 (CLIPTextModelWithProjection) in OpenCLIP's layout: q, k, v fused, the projection transposed."""
    from transformers import CLIPTextModelWithProjection
    sd = CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2").state_dict()
    top = DIFFUSERS_TO_LDM_MAPPING["openclip"]["layers"]
    out = {prefix + top[k]: v.T if k == "text_projection.weight" else v for k, v in sd.items() if k in top}
    names = (("text_model.encoder.layers.", "transformer.resblocks."), ("layer_norm1", "ln_1"),
             ("layer_norm2", "ln_2"), (".fc1.", ".c_fc."), (".fc2.", ".c_proj."), (".self_attn.", ".attn."))
    for k, v in sd.items():
        if not k.startswith("text_model.encoder.layers.") or ".k_proj." in k or ".v_proj." in k:
            continue
        ldm = k
        for new, old in names:
            ldm = ldm.replace(new, old)
        if ".q_proj." in k:  # q, k, v as one in_proj
            v = torch.cat([sd[k.replace(".q_proj.", f".{p}_proj.")] for p in "qkv"])
            ldm = ldm.replace(".q_proj.", ".in_proj_")  # ...attn.in_proj_weight
        out[prefix + ldm] = v
    return out


def make_sdxl_with_distinct_encoders(path):
    """A tiny SDXL whose two text encoders differ in width (32 and 48), as CLIP-L and CLIP-G do: diffusers tells
    a single file's encoders apart by their widths, so the fixtures' equal-width pair would be read crossed."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from models import DENOISERS, clip_config, tiny_vae
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    torch.manual_seed(0)
    tok = byte_clip_tokenizer()
    wide = dict(clip_config("tiny", vocab=len(tok), hidden_act="gelu"), hidden_size=48, projection_dim=48)
    pipe = StableDiffusionXLPipeline(
        vae=AutoencoderKL(**tiny_vae(scaling_factor=0.13025)),
        text_encoder=CLIPTextModel(CLIPTextConfig(**clip_config("tiny", vocab=len(tok), hidden_act="gelu"))),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**wide)), tokenizer=tok, tokenizer_2=tok,
        unet=UNet2DConditionModel(**dict(DENOISERS[("sdxl", "tiny")][1], cross_attention_dim=80,
                                         projection_class_embeddings_input_dim=6 * 8 + 48)),
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         steps_offset=1, timestep_spacing="leading"))
    pipe.save_pretrained(path)
    return str(path)


def write_single_file(folder, path, clip_prefix, open_clip_prefix=None, seed=0):
    """`folder`'s UNet (its weights moved a little: a fine-tune of the base), VAE and text encoders as one
    original-layout safetensors file. Returns the fine-tuned UNet's state dict."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    g = torch.Generator().manual_seed(seed)
    tuned = {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in unet.state_dict().items()}
    state = {f"model.diffusion_model.{ldm_unet_key(k, unet.config)}": v for k, v in tuned.items()}
    state.update({f"first_stage_model.{ldm_vae_key(k, vae.config)}": v for k, v in vae.state_dict().items()})
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
    state.update({f"{clip_prefix}text_model.{k.removeprefix('text_model.')}": v
                  for k, v in text_encoder.state_dict().items()})
    if open_clip_prefix:
        state.update(open_clip_state(folder, open_clip_prefix))
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return tuned


def argv(model, base, shards, out, *extra):
    return ["--model", str(model), "--base_model", base, "--shards", *shards, "--output_dir", str(out),
            "--resolution", "32", "--batch_size", "2", "--phase_steps", "0", "1", "1", "0", "--num_teacher_steps", "4",
            "--mixed_precision", "no", "--num_workers", "1", "--lora_rank", "4", "--lora_alpha", "8",
            "--distill_loss", "l2", "--lr", "3e-3", "--lr_disc", "3e-3", "--log_every", "1", "--sample_every", "100",
            "--checkpoint_every", "1", "--validation_prompts", "a red square", *extra]


SDXL_TEXT = ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model.")


@pytest.fixture(scope="module")
def sdxl_model(tmp_path_factory):
    return make_sdxl_with_distinct_encoders(tmp_path_factory.mktemp("models") / "tiny-sdxl-48")


@pytest.fixture(scope="module")
def sdxl_file(sdxl_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("single") / "tuned-sdxl.safetensors"
    return path, write_single_file(sdxl_model, path, *SDXL_TEXT)


def test_the_written_file_is_what_from_single_file_reads(sdxl_file, sdxl_model):
    """The test's own writer is right: diffusers reads back the fine-tuned UNet, the VAE and both text encoders,
    every key, every value."""
    from diffusers import StableDiffusionXLPipeline
    path, tuned = sdxl_file
    pipe = StableDiffusionXLPipeline.from_single_file(str(path), config=sdxl_model)
    base = StableDiffusionXLPipeline.from_pretrained(sdxl_model)
    assert pipe.unet.state_dict().keys() == tuned.keys()
    assert all(torch.equal(pipe.unet.state_dict()[k], tuned[k]) for k in tuned)
    for name in ("vae", "text_encoder", "text_encoder_2"):
        ours, theirs = getattr(pipe, name).state_dict(), getattr(base, name).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name


def test_sdxl_single_file_trains_resumes_without_converting_again_and_its_lora_loads_onto_the_file(
        sdxl_file, sdxl_model, shards, tmp_path):
    from diffusers import StableDiffusionXLPipeline
    path, tuned = sdxl_file
    out = tmp_path / "run"
    m, step = flash_sdxl.main(argv(path, sdxl_model, shards, out, "--max_steps", "1"))
    assert step == 1 and open(out / "model" / "converted_from.json").read().count(str(path)) == 1
    with flash_sdxl.teacher_mode(m.denoiser):  # the teacher is the file's UNet, not the base folder's
        base = {k: v for k, v in m.denoiser.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(base[k.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")]
                           if k not in base else base[k], v) for k, v in tuned.items())
    unet_file = out / "model" / "unet" / "diffusion_pytorch_model.safetensors"
    converted_at = os.stat(unet_file).st_mtime_ns
    m, step = flash_sdxl.main(argv(path, sdxl_model, shards, out, "--resume", "latest"))
    assert step == 2 and [r["step"] for r in metrics(out)] == [1, 2]
    assert os.stat(unet_file).st_mtime_ns == converted_at  # the resumed run loaded the folder as it was
    pipe = StableDiffusionXLPipeline.from_single_file(str(path), config=sdxl_model)
    pipe.load_lora_weights(str(out))
    torch.manual_seed(0)
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([749])
    c = dict(encoder_hidden_states=torch.randn(1, 77, 80),
             added_cond_kwargs=dict(text_embeds=torch.randn(1, 48), time_ids=torch.tensor([[32.0, 32, 0, 0, 32, 32]])))
    with torch.no_grad():
        ours = m.denoiser(x, t, **c).sample
        torch.testing.assert_close(pipe.unet(x, t, **c).sample, ours, rtol=1e-5, atol=1e-5)
        with flash_sdxl.teacher_mode(m.denoiser):
            assert (m.denoiser(x, t, **c).sample - ours).abs().max() > 1e-4  # the LoRA trained


def test_sd15_and_adapter_single_files_convert_into_the_output_folder(sd_model, sdxl_model, adapter_model, shards,
                                                                       tmp_path):
    """SD1.5 (UNet, VAE and CLIP in the file) and the adapter script's SDXL: diffusers_folder converts each."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel
    for mod, model, text in ((flash_sd, sd_model, ["cond_stage_model.transformer."]),
                             (flash_adapter, sdxl_model, SDXL_TEXT)):
        path = tmp_path / f"{mod.NAME}.safetensors"
        tuned = write_single_file(model, path, *text, seed=1)
        extra = ["--adapter", f"{adapter_model}/adapter"] if mod is flash_adapter else []
        args = mod.parse_args(argv(path, model, shards, tmp_path / mod.NAME, *extra))
        assert mod.config_source(args) == model
        folder = mod.diffusers_folder(args, torch.device("cpu"))
        assert folder == str(tmp_path / mod.NAME / "model")
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
        assert all(torch.equal(unet.state_dict()[k], v) for k, v in tuned.items())
        if mod is flash_sd:
            te = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder").state_dict()
            base = CLIPTextModel.from_pretrained(model, subfolder="text_encoder").state_dict()
            assert all(torch.equal(te[k], v) for k, v in base.items())


def test_single_file_flags_are_checked_at_start_up_in_one_line(sd_model, shards, tmp_path, capsys):
    for mod in (flash_sd, flash_sdxl, flash_adapter):
        with pytest.raises(SystemExit):
            mod.parse_args(["-h"])
        text = " ".join(capsys.readouterr().out.split())
        assert ".safetensors/.ckpt file (with --base_model)" in text and "--base_model BASE_MODEL" in text
    (tmp_path / "weights.bin").write_bytes(b"")
    (tmp_path / "tuned.safetensors").write_bytes(b"")
    cases = [(tmp_path / "missing.safetensors", sd_model, "no such .safetensors or .ckpt file"),
             (tmp_path / "weights.bin", sd_model, "no such .safetensors or .ckpt file"),
             (tmp_path / "tuned.safetensors", None, "a single file; name its base model's diffusers folder"),
             (sd_model, sd_model, "--base_model: only with a single-file --model"),
             (tmp_path / "tuned.safetensors", str(tmp_path), f"--base_model {tmp_path}: cannot read")]
    for model, base, says in cases:
        a = argv(model, base, shards, tmp_path / "out")
        if base is None:
            del a[2:4]
        with pytest.raises(common.UsageError, match=says) as e:
            flash_sd.check_args(flash_sd.parse_args(a))
        assert "\n" not in str(e.value)
