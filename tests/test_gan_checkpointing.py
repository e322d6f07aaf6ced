"""--gradient_checkpointing and the GAN's fake feature pass. The pass runs in teacher mode (LoRA off) and
backpropagates to x_hat; checkpointing would recompute it during the generator's backward with the LoRA back
on. With checkpointing, each script takes the adversarial gradient w.r.t. the pass's input inside teacher mode
(torch.autograd.grad, where the recomputation happens) and carries it into the one generator backward; without,
the pass joins that backward as it always did. Both must give the same update."""
import importlib

import pytest
import torch
from conftest import SCRIPTS

import common

CPU = torch.device("cpu")


def grads(*modules):
    return {f"{i}.{n}": p.grad.clone() for i, mod in enumerate(modules) for n, p in mod.named_parameters()
            if p.requires_grad}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_checkpointed_gan_pass_gives_the_same_gradients(name, request, shards, tmp_path):
    """One phase-1 train_step (distillation and the GAN at weight 0.5; DMD, which the change does not touch,
    off to save time) with checkpointing equals one without: the LoRA's and the discriminator's gradients and
    the losses, same seed, same batch (on this CPU they are bitwise equal). The LoRA is random, so the student
    differs from the teacher: the pass checkpointed inside the one backward (recomputed with the LoRA on) stops
    with torch's CheckpointError. A third step at adversarial weight 0 shows that the GAN's share of the LoRA
    gradient is far above the tolerance."""
    fixture, extra = SCRIPTS[name]
    model = request.getfixturevalue(fixture)
    mod = importlib.import_module(name)
    args = mod.parse_args(["--model", model, *(e.format(model=model) for e in extra), "--shards", *shards,
                           "--output_dir", str(tmp_path), "--resolution", "32", "--batch_size", "2",
                           "--num_teacher_steps", "4", "--mixed_precision", "no", "--lora_rank", "4",
                           "--lora_alpha", "8", "--distill_loss", "l2", "--phase_steps", "0", "1", "0", "0",
                           "--adv_weights", "0", "0.5", "0", "0", "--dmd_weights", "0", "0", "0", "0",
                           "--gradient_checkpointing"])
    torch.manual_seed(0)
    m = mod.build(args, CPU)
    for n, p in m.denoiser.named_parameters():  # a trained-looking LoRA: the student is not the teacher
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    m.start_probs = [torch.eye(4)[3]] * 4  # k = K - 1: a one-step teacher solve keeps the test fast
    batch = next(iter(common.make_loader(args.shards, 32, 2, num_workers=0, min_aesthetic=-1, extra=m.extra)))
    runs = {}
    for case in ("checkpointed", "no adv", "plain"):
        if case == "plain":  # what build does without the flag
            m.denoiser.disable_gradient_checkpointing()
            m.vae.disable_gradient_checkpointing()
        assert m.denoiser.is_gradient_checkpointing == (case != "plain")
        args.adv_weights[1] = 0.0 if case == "no adv" else 0.5
        for p in [*m.denoiser.parameters(), *m.disc.parameters()]:
            p.grad = None
        torch.manual_seed(1)
        losses = mod.train_step(m, m.denoiser, m.disc, batch, 0, args)
        runs[case] = losses, grads(m.denoiser, m.disc)
    (l_ckpt, g_ckpt), (_, g_no_adv), (l_plain, g_plain) = runs.values()
    assert g_ckpt.keys() == g_plain.keys() and {k[:2] for k in g_plain} == {"0.", "1."}  # LoRA and head
    assert all(float(l_plain[k]) > 0 for k in ("distill", "adv", "disc"))
    for k in ("distill", "adv", "disc", "loss_g"):
        torch.testing.assert_close(l_ckpt[k], l_plain[k], rtol=1e-6, atol=1e-7)
    for k in g_plain:
        torch.testing.assert_close(g_ckpt[k], g_plain[k], rtol=1e-5, atol=1e-8, msg=k)
    lora = [k for k in g_plain if k.startswith("0.")]
    share = max(float((g_plain[k] - g_no_adv[k]).abs().max() / g_plain[k].abs().max()) for k in lora)
    assert share > 1e-2
