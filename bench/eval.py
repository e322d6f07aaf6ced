"""The paper's table for a trained student: FID and CLIP score at 1, 2 and 4 steps, against the teacher.

Flash Diffusion (arXiv 2406.02347) measures the student at 1-4 LCM steps without CFG beside the teacher at its
usual steps with CFG, on COCO captions (Flash SD: COCO-2017 val, 5k images). This script builds that table for
a run of any flash_*.py script, with the backbone's stock diffusers pipeline and the LoRA loaded the way a user
loads it (`load_lora_weights`; PEFT for PixArt):

    python bench/eval.py --backbone sd --student runs/flash_sd --prompts coco/annotations/captions_val2017.json \
        --reference coco/val2017 --out runs/eval_sd
    torchrun --standalone --nproc_per_node=8 bench/eval.py ...   # the same flags; each GPU takes a slice

Images go to out/<row>/<index:05d>.png (rows teacher, student_1, student_2, student_4), so a stopped run
resumes where it stopped; then rank 0 writes out/table.md, out/table.json and out/grid.png. FID is clean-fid's
("clean" resize, Inception-v3); CLIP score is the cosine similarity of open_clip ViT-g-14 (laion2b_s12b_b42k)
image and caption embeddings. See README.md, "Evaluate your student".
"""
import argparse
import importlib
import inspect
import json
import os
import platform
import sys
import time
from importlib.metadata import version

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageOps, PngImagePlugin
from torchvision.transforms.functional import pil_to_tensor, to_pil_image
from torchvision.utils import make_grid
from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402

# backbone: (its training script, its stock pipeline). --model, --resolution (and the adapter's and SD3's
# settings) default to the script's values; the teacher's steps and CFG to the pipeline's own defaults
BACKBONES = {"sd": ("flash_sd", "StableDiffusionPipeline"), "sdxl": ("flash_sdxl", "StableDiffusionXLPipeline"),
             "adapter": ("flash_adapter", "StableDiffusionXLAdapterPipeline"),
             "pixart": ("flash_pixart", "PixArtAlphaPipeline"), "sd3": ("flash_sd3", "StableDiffusion3Pipeline"),
             "flux": ("flash_flux", "FluxPipeline")}
SCRIPT_DEFAULTS = dict(model="MODEL", resolution="RESOLUTION", adapter="ADAPTER",
                       adapter_conditioning_scale="ADAPTER_SCALE", student_K="NUM_TEACHER_STEPS")
NUM_IMAGES = 5000  # COCO-2017 val: 5k images, one caption each (the Flash SD model card)
STUDENT_STEPS = [1, 2, 4]
CLIP_MODEL, CLIP_PRETRAINED = "ViT-g-14", "laion2b_s12b_b42k"  # the paper's CLIP ViT-g/14
METRIC_BATCH = 32  # images per Inception / CLIP batch
GRID_PROMPTS = 4  # rows of grid.png
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--backbone", required=True, choices=list(BACKBONES), help="the flash_*.py script the student comes from")
    a("--model", default=None, help="base model, hub id or local folder (none: the script's --model default)")
    a("--student", required=True, help="a run's --output_dir or one of its checkpoints/step_NNNNNN folders")
    a("--prompts", required=True, help="a COCO captions json (e.g. captions_val2017.json: the caption with the "
      "lowest id of each image, images in id order) or a text file, one prompt per line")
    a("--reference", required=True, help="folder of the reference images (COCO: val2017/); with a COCO json the "
      "images of the chosen captions, with a text file every image in the folder")
    a("--num_images", type=int, default=NUM_IMAGES, help="images per row: the first N prompts")
    a("--student_steps", type=int, nargs="+", default=STUDENT_STEPS, help="the student's LCM steps, no CFG")
    a("--teacher_steps", type=int, default=None, help="the teacher's steps (none: the stock pipeline's: SD1.5 "
      "and SDXL 50, PixArt 20, SD3 28)")
    a("--teacher_guidance", type=float, default=None, help="the teacher's CFG scale (none: the stock pipeline's: "
      "SD1.5 7.5, SDXL 5, PixArt 4.5, SD3 7)")
    a("--resolution", type=int, default=None, help="square image size (none: the script's training resolution)")
    a("--batch_size", type=int, default=8, help="prompts per pipeline call, per GPU")
    a("--seed", type=int, default=0, help="image i uses seed + i in every row: the same noise per prompt")
    a("--out", default="runs/eval", help="images (out/<row>/<index>.png), table.md, table.json, grid.png")
    a("--adapter", default=None, help="adapter: the T2I-Adapter (none: flash_adapter.py's). The edge map of each "
      "prompt is cv2.Canny of its caption's reference image (flash_adapter.canny_edges): --prompts must be COCO json")
    a("--adapter_conditioning_scale", type=float, default=None, help="adapter: none: flash_adapter.py's")
    a("--use_t5", action=argparse.BooleanOptionalAction, default=None,
      help="sd3: load T5 or not, as the student trained (default: flash_sd3.py's per-model default: off for "
      "SD3 Medium, on for SD3.5)")
    a("--student_K", type=int, default=None, help="sd3: the run's --num_teacher_steps; the student samples at "
      "flash_sd3.student_sigmas of that K-step grid (none: flash_sd3.py's)")
    a("--clip_model", default=CLIP_MODEL, help="open_clip model name, or local-dir:FOLDER (open_clip_config.json "
      "and weights, e.g. a download of laion/CLIP-ViT-g-14-laion2B-s12B-b42K)")
    a("--clip_pretrained", default=CLIP_PRETRAINED, help="open_clip tag or local weights file (unused with local-dir:)")
    a("--inception_dir", default="/tmp", help="folder of clean-fid's inception-2015-12-05.pt (downloaded there if "
      "missing; /tmp is where clean-fid itself keeps it)")
    a("--num_workers", type=int, default=8, help="image loading processes for the FID features")
    a("--generate_only", action="store_true", help="write the images and stop (no metrics, no table)")
    return p.parse_args(argv)


def load_prompts(path):
    """(prompts, image file names or None). A COCO captions json gives one caption per image, the one with the
    lowest annotation id, images in id order; a text file gives one prompt per non-empty line."""
    with open(path) as f:
        if not path.endswith(".json"):
            return [line.strip() for line in f if line.strip()], None
        text = f.read()
    try:
        coco, first = json.loads(text), {}
        for ann in sorted(coco["annotations"], key=lambda x: x["id"]):
            first.setdefault(ann["image_id"], ann["caption"].strip())
        images = sorted((im for im in coco["images"] if im["id"] in first), key=lambda im: im["id"])
    except (ValueError, KeyError, TypeError) as e:
        raise common.UsageError(f"--prompts {path}: not a COCO captions file (images, annotations): {e!r}")
    return [first[im["id"]] for im in images], [im["file_name"] for im in images]


def check_args(args):
    """Start-up checks before any model is loaded; fills in the training script's defaults. Returns the script's
    module, the prompts and the reference image files (index-aligned with the prompts for a COCO json)."""
    if args.num_images < 2 or args.batch_size < 1 or min(args.student_steps) < 1 or (args.resolution or 8) < 8:
        raise common.UsageError("--num_images must be at least 2 (FID needs a covariance); --batch_size, "
                                "--student_steps and --resolution positive")
    if not os.path.isdir(args.reference):
        raise common.UsageError(f"--reference {args.reference}: no such folder; give the folder of the reference "
                                "images, e.g. COCO's val2017/")
    lora = "adapter_config.json" if args.backbone == "pixart" else "pytorch_lora_weights.safetensors"
    if not os.path.isfile(os.path.join(args.student, lora)):
        root = os.path.join(args.student, "checkpoints")
        found = sorted(n for n in os.listdir(root) if n[5:].isdigit()) if os.path.isdir(root) else []
        hint = f"; its newest checkpoint is {os.path.join(root, found[-1])}" if found else ""
        raise common.UsageError(f"--student {args.student}: no {lora} there; give a {BACKBONES[args.backbone][0]}.py "
                                f"--output_dir after its last update, or a checkpoints/step_NNNNNN folder{hint}")
    if not os.path.isfile(args.prompts):
        raise common.UsageError(f"--prompts {args.prompts}: no such file")
    prompts, names = load_prompts(args.prompts)
    if len(prompts) < args.num_images:
        raise common.UsageError(f"--prompts {args.prompts} has {len(prompts)} prompts, fewer than --num_images "
                                f"{args.num_images}; lower --num_images to at most {len(prompts)}")
    if names is None:
        if args.backbone == "adapter":
            raise common.UsageError("--backbone adapter needs --prompts as a COCO captions json: the edge map of "
                                    "each prompt is the canny edges of its caption's reference image")
        files = sorted(os.path.join(args.reference, n) for n in os.listdir(args.reference)
                       if n.lower().endswith(IMAGE_EXTS))
        if len(files) < 2:
            raise common.UsageError(f"--reference {args.reference}: fewer than 2 images ({', '.join(IMAGE_EXTS)})")
    else:
        files = [os.path.join(args.reference, n) for n in names[:args.num_images]]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise common.UsageError(f"--reference {args.reference}: {len(missing)} of the {len(files)} images the "
                                    f"captions name are not there (e.g. {os.path.basename(missing[0])})")
    script = importlib.import_module(BACKBONES[args.backbone][0])
    for flag, name in SCRIPT_DEFAULTS.items():  # a value the backbone's script lacks stays None
        if getattr(args, flag) is None:
            setattr(args, flag, getattr(script, name, None))
    if args.backbone == "sd3" and args.use_t5 is None:  # as flash_sd3.py trains this model by default
        args.use_t5 = script.PER_MODEL[script.model_family(args.model)]["use_t5"]
    return script, prompts[:args.num_images], files


# ------------------------------------------------------------------------------------------------------
# generation: the stock pipeline, the teacher first, then the LoRA loaded as a user loads it
# ------------------------------------------------------------------------------------------------------

def model_rows(args):
    """{row: (steps, CFG scale, NFE)}: the teacher at the stock pipeline's steps and CFG unless given, then the
    student at each of --student_steps without CFG. NFE counts a CFG step as 2 network evaluations. FLUX.1-dev
    takes its guidance as an input of one pass: the student keeps the teacher's guidance scale, one NFE a step."""
    import diffusers
    call = inspect.signature(getattr(diffusers, BACKBONES[args.backbone][1]).__call__).parameters
    steps = args.teacher_steps or call["num_inference_steps"].default
    w = call["guidance_scale"].default if args.teacher_guidance is None else args.teacher_guidance
    embedded = args.backbone == "flux"
    rows = {"teacher": (steps, w, 2 * steps if w > 1 and not embedded else steps)}
    return {**rows, **{f"student_{n}": (n, w if embedded else 0.0, n) for n in args.student_steps}}


def load_pipeline(args, device, dtype):
    import diffusers
    kw = dict(dtype=dtype)
    if args.backbone == "sd":
        kw.update(safety_checker=None, requires_safety_checker=False)
    if args.backbone == "adapter":
        kw["adapter"] = diffusers.T2IAdapter.from_pretrained(args.adapter, dtype=dtype)
    if args.backbone == "sd3" and not args.use_t5:  # as flash_sd3.py trains SD3 Medium by default
        kw.update(text_encoder_3=None, tokenizer_3=None)
    pipe = getattr(diffusers, BACKBONES[args.backbone][1]).from_pretrained(args.model, **kw).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_student(pipe, args, script):
    """The LoRA and the student's sampler (LCM, trailing; SD3: FlowMatchLCM at flash_sd3.student_sigmas).
    Returns n -> the pipeline arguments of an n-step student call."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchLCMScheduler, LCMScheduler
    if args.backbone == "pixart":  # PixArtAlphaPipeline has no load_lora_weights
        from peft import PeftModel
        pipe.transformer = PeftModel.from_pretrained(pipe.transformer, args.student)
    else:
        pipe.load_lora_weights(args.student)
    config = pipe.scheduler.config
    if args.backbone == "flux":  # the stock few-step grid, which flash_flux.py trains on, at the model's guidance
        pipe.scheduler = FlowMatchLCMScheduler.from_config(config)
        w = model_rows(args)["teacher"][1]
        return lambda n: dict(num_inference_steps=n, guidance_scale=w)
    if args.backbone != "sd3":
        pipe.scheduler = LCMScheduler.from_config(config, timestep_spacing="trailing")
        return lambda n: dict(num_inference_steps=n, guidance_scale=0.0)
    grid = FlowMatchEulerDiscreteScheduler.from_config(config)
    grid.set_timesteps(args.student_K)  # the run's K-step teacher grid, shifted
    pipe.scheduler = FlowMatchLCMScheduler.from_config(config, shift=1.0)  # the sigmas are already shifted
    return lambda n: dict(sigmas=script.student_sigmas(grid.sigmas, n), guidance_scale=0.0)


def edge_maps(files, resolution, channels, script):
    """The adapter's input: flash_adapter.canny_edges of each reference image, cropped as in training;
    (B, channels, H, W) in [0, 1]."""
    maps = []
    for f in files:
        with Image.open(f) as img:
            img = common.resize_center_crop(common.to_rgb(ImageOps.exif_transpose(img)), resolution)
        maps.append(torch.from_numpy(script.canny_edges(img, resolution).astype(np.float32) / 255))
    return torch.stack(maps)[:, None].expand(-1, channels, -1, -1)


def image_path(out, row, i):
    return os.path.join(out, row, f"{i:05d}.png")


@torch.no_grad()
def generate(pipe, call, todo, prompts, args, row, device, rank, extra=None):
    """The images `todo` of one row, batched; image i starts from the noise of seed + i. Each PNG is written
    under a temporary name and renamed, so a stopped run leaves no half-written image. Returns the seconds
    spent in the pipeline."""
    seconds = 0.0
    for s in tqdm(range(0, len(todo), args.batch_size), desc=row, disable=rank != 0, dynamic_ncols=True):
        idx = todo[s:s + args.batch_size]
        gens = [torch.Generator(device).manual_seed(args.seed + i) for i in idx]
        torch.manual_seed(args.seed + idx[0])  # SD3's pipeline re-noises between steps from the global RNG
        t = time.perf_counter()
        images = pipe([prompts[i] for i in idx], generator=gens, height=args.resolution, width=args.resolution,
                      **call, **(extra(idx) if extra else {})).images
        seconds += time.perf_counter() - t
        for i, img in zip(idx, images):
            info = PngImagePlugin.PngInfo()
            for k, v in (("prompt", prompts[i]), ("seed", args.seed + i), ("rank", rank)):
                info.add_text(k, str(v))
            img.save(image_path(args.out, row, i) + ".tmp", format="PNG", pnginfo=info)
            os.replace(image_path(args.out, row, i) + ".tmp", image_path(args.out, row, i))
    return seconds


# ------------------------------------------------------------------------------------------------------
# metrics (clean-fid's FID, open_clip's CLIP score) and the report
# ------------------------------------------------------------------------------------------------------

def inception_stats(files, extractor, device, num_workers, desc=""):
    """Mean and covariance of clean-fid's features of these images: its "clean" resize (PIL bicubic to
    299 x 299), then `extractor` (clean-fid's Inception-v3 in the table)."""
    from cleanfid import fid
    feats = fid.get_files_features(files, extractor, num_workers=num_workers, batch_size=METRIC_BATCH, device=device,
                                   mode="clean", description=desc, verbose=bool(desc))
    return np.mean(feats, axis=0), np.cov(feats, rowvar=False)


def fid_score(stats_a, stats_b):
    from cleanfid import fid
    return float(fid.frechet_distance(*stats_a, *stats_b))


def reference_stats(files, extractor, device, num_workers, cache):
    """inception_stats of the reference images, kept in `cache` (npz) and reused for the same files."""
    if os.path.exists(cache):
        saved = np.load(cache)
        if saved["files"].tolist() == files:
            return saved["mu"], saved["sigma"]
    mu, sigma = inception_stats(files, extractor, device, num_workers, desc="FID reference")
    np.savez(cache, mu=mu, sigma=sigma, files=np.array(files))
    return mu, sigma


def load_clip(name, pretrained, device):
    import open_clip
    pretrained = None if name.startswith("local-dir:") else pretrained
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device)
    return model.eval(), preprocess, open_clip.get_tokenizer(name)


@torch.no_grad()
def clip_score(files, captions, clip, device):
    """Mean over the images of the cosine similarity between CLIP's embeddings of an image and of its caption."""
    model, preprocess, tokenizer = clip
    sims = []
    for s in range(0, len(files), METRIC_BATCH):
        x = torch.stack([preprocess(Image.open(f).convert("RGB")) for f in files[s:s + METRIC_BATCH]]).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            a, b = model.encode_image(x), model.encode_text(tokenizer(captions[s:s + METRIC_BATCH]).to(device))
        sims.append(F.cosine_similarity(a.float(), b.float(), dim=-1).cpu())
    return float(torch.cat(sims).mean())


def environment(device, world_size):
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    if device.type == "cpu" and os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
    packages = ("torch", "diffusers", "transformers", "peft", "clean-fid", "open-clip-torch")
    return dict(device=device.type, name=name, processes=world_size, **{p: version(p) for p in packages})


def write_table(out, rows, info, env):
    """table.json and table.md; returns the markdown."""
    with open(os.path.join(out, "table.json"), "w") as f:
        json.dump(dict(rows=rows, **info, environment=env), f, indent=1)
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    md = [f"Student `{info['student']}` ({info['backbone']}) on `{info['model']}`: {info['images']} prompts of "
          f"`{info['prompts']}`, reference `{info['reference']}`, {info['resolution']} px, seed {info['seed']}.", "",
          "| model | steps | NFE | FID | CLIP score | s / image | images |", "|---|---|---|---|---|---|---|"]
    md += [f"| {r['model']} | {r['steps']} | {r['nfe']} | {fmt(r['fid'], '.2f')} | {fmt(r['clip_score'], '.4f')} | "
           f"{fmt(r['seconds_per_image'], '.3f')} | {r['images']} |" for r in rows]
    md += ["", "FID: clean-fid, \"clean\" mode (PIL bicubic resize to 299 px), Inception-v3 features, against the "
           "reference images. CLIP score: cosine similarity (not x100) of the image and caption embeddings of "
           f"open_clip {info['clip']}, mean over the images. NFE: network evaluations per image; a CFG step counts "
           "2. s / image: pipeline wall time per image and process (GPU), over the images this run generated "
           "(-: none).", "",
           "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()) + "."]
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    return "\n".join(md)


def save_grid(out, rows, n, edges=None):
    """grid.png: the first n prompts (rows) across the model rows (columns); the adapter's edge map first."""
    columns = ([list(edges.expand(-1, 3, -1, -1))] if edges is not None else []) + [
        [pil_to_tensor(Image.open(image_path(out, row, i)).convert("RGB")) / 255 for i in range(n)] for row in rows]
    images = torch.stack([c[i] for i in range(n) for c in columns])
    if images.shape[-1] < 128:  # tiny models: upscaled so the pictures and the labels can be seen
        images = F.interpolate(images, scale_factor=128 // images.shape[-1], mode="nearest")
    grid = to_pil_image(make_grid(images, nrow=len(columns), padding=0))
    page = Image.new("RGB", (grid.width, grid.height + 14), "white")
    page.paste(grid, (0, 14))
    for j, label in enumerate((["edges"] if edges is not None else []) + list(rows)):
        ImageDraw.Draw(page).text((j * images.shape[-1] + 2, 1), label, fill="black")
    page.save(os.path.join(out, "grid.png"))


def main(argv=None, feat_extractor=None):
    """Generates what is missing, then (rank 0) the metrics and the table, which it returns. feat_extractor:
    clean-fid's custom_feat_extractor for the FID features; None: clean-fid's Inception-v3."""
    args = parse_args(argv)
    script, prompts, ref_files = check_args(args)
    ddp, cuda = "RANK" in os.environ, torch.cuda.is_available()  # torchrun sets RANK; else a single process
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if ddp:
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)

    rows, todo = model_rows(args), {}
    for row in rows:  # this rank's slice (index % world_size == rank) of what is not written yet
        os.makedirs(os.path.join(args.out, row), exist_ok=True)
        todo[row] = [i for i in range(rank, args.num_images, world_size)
                     if not os.path.exists(image_path(args.out, row, i))]
    shared = dict(use_resolution_binning=False, clean_caption=False) if args.backbone == "pixart" else {}
    extra = None  # per-batch pipeline inputs
    if args.backbone == "adapter":  # prompt i's edge map: the canny edges of its reference image
        from diffusers import T2IAdapter
        shared["adapter_conditioning_scale"] = args.adapter_conditioning_scale
        ch = T2IAdapter.load_config(args.adapter)["in_channels"]
        extra = lambda idx: dict(  # noqa: E731
            image=edge_maps([ref_files[i] for i in idx], args.resolution, ch, script))
    pipe, student = None, None
    timing = torch.zeros(len(rows), 2, dtype=torch.float64, device=device)  # seconds, images generated
    for j, (row, (n, w, _)) in enumerate(rows.items()):
        if not todo[row]:
            continue
        if pipe is None:
            pipe = load_pipeline(args, device, torch.bfloat16 if cuda else torch.float32)
        if row == "teacher":
            call = dict(num_inference_steps=n, guidance_scale=w)
        else:
            student = student or load_student(pipe, args, script)
            call = student(n)
        timing[j, 0] = generate(pipe, {**shared, **call}, todo[row], prompts, args, row, device, rank, extra)
        timing[j, 1] = len(todo[row])
    if ddp:
        dist.all_reduce(timing)
        dist.barrier()
        dist.destroy_process_group()
    if rank != 0 or args.generate_only:
        return None

    if feat_extractor is None:
        from cleanfid.inception_torchscript import InceptionV3W
        feat_extractor = InceptionV3W(args.inception_dir, download=True).to(device).eval()
    clip = load_clip(args.clip_model, args.clip_pretrained, device)
    cache = os.path.join(args.out, "reference_stats.npz")
    ref = reference_stats(ref_files, feat_extractor, device, args.num_workers, cache)
    table = []
    for (row, (n, w, nfe)), (secs, made) in zip(rows.items(), timing.tolist()):
        files = [image_path(args.out, row, i) for i in range(args.num_images)]
        stats = inception_stats(files, feat_extractor, device, args.num_workers, desc=f"FID {row}")
        table.append(dict(model=row.split("_")[0], steps=n, nfe=nfe, guidance=w, fid=fid_score(stats, ref),
                          clip_score=clip_score(files, prompts, clip, device), images=len(files),
                          seconds_per_image=secs / made if made else None, generated=int(made)))
    clip_name = args.clip_model
    if not clip_name.startswith("local-dir:"):
        clip_name += f" ({args.clip_pretrained})"
    info = dict(backbone=args.backbone, model=args.model, student=args.student, prompts=args.prompts,
                reference=args.reference, reference_images=len(ref_files), images=args.num_images,
                resolution=args.resolution, seed=args.seed, clip=clip_name)
    print(write_table(args.out, table, info, environment(device, world_size)))
    n = min(GRID_PROMPTS, args.num_images)
    save_grid(args.out, list(rows), n, extra(range(n))["image"][:, :1] if extra else None)
    return table


if __name__ == "__main__":
    try:
        main()
    except common.UsageError as e:
        raise SystemExit(f"eval.py: error: {e}")
