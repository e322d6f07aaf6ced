"""--dmd_gan_from_noise on each script: the DMD and adversarial terms join the generator's loss only on batches
whose start index is k = 0 (the student's step from pure noise, its 1-step output); on k > 0 batches the
generator learns from distillation alone, while the discriminator still trains. Off by default (the paper's
recipe). The real train_step runs, in phase 2 (DMD and GAN weights > 0)."""
import torch

ZERO = ["0", "0", "0", "0"]


def test_dmd_gan_from_noise_drops_both_terms_for_k_above_0_only_and_is_off_by_default(script, shards, tmp_path):
    mod, argv = script
    phase2 = ["--phase_steps", "0", "1", "0", "0"]  # batch 0 is in phase 2: every weight > 0
    off = mod.parse_args(argv(shards, tmp_path / "run", *phase2))
    assert not off.dmd_gan_from_noise  # the paper's recipe unless asked
    on = mod.parse_args(argv(shards, tmp_path / "run", *phase2, "--dmd_gan_from_noise"))
    no_aux = mod.parse_args(argv(shards, tmp_path / "run", *phase2, "--dmd_weights", *ZERO, "--adv_weights", *ZERO))
    torch.manual_seed(0)
    m = mod.build(on, torch.device("cpu"))
    for name, w in m.denoiser.named_parameters():  # a trained-looking LoRA: DMD's fake score differs from the real
        if "lora_B" in name:
            torch.nn.init.normal_(w, std=0.05)
    batch = dict(pixel_values=torch.rand(2, 3, 32, 32) * 2 - 1, text=["a red square", "a blue circle"])
    if mod.__name__ == "flash_adapter":
        batch["edges"] = (torch.rand(2, m.adapter.config.in_channels, 32, 32) > 0.8).float()
    K = on.num_teacher_steps
    params = dict(m.denoiser.named_parameters(), **{"disc." + n: p for n, p in m.disc.named_parameters()})

    def step(args, k):
        """One train_step at start index k: its losses and every gradient it leaves (LoRA and D)."""
        m.start_probs = [torch.eye(K)[k]] * 4
        for p in params.values():
            p.grad = None
        torch.manual_seed(1)
        losses = mod.train_step(m, m.denoiser, m.disc, batch, 0, args)
        return losses, {n: p.grad.clone() for n, p in params.items() if p.grad is not None}

    # k > 0: exactly the update with the DMD and GAN weights at zero; D still learns from the same features
    (l_on, g_on), (l_ref, g_ref) = step(on, K // 2), step(no_aux, K // 2)
    assert l_on["dmd"] == 0 and l_on["adv"] == 0 and l_on["distill"] > 0
    assert torch.equal(l_on["loss_g"], l_ref["loss_g"]) and torch.equal(l_on["disc"], l_ref["disc"])
    assert g_on.keys() == g_ref.keys() and all(torch.equal(g_on[n], g_ref[n]) for n in g_on)
    assert any(n.startswith("disc.") and g.abs().sum() > 0 for n, g in g_on.items())  # the discriminator trains
    assert any("lora" in n and g.abs().sum() > 0 for n, g in g_on.items())
    # k = 0: the flag changes nothing, and both terms are in the loss
    (l_on, g_on), (l_off, g_off) = step(on, 0), step(off, 0)
    assert l_on["dmd"] > 0 and l_on["adv"] != 0
    assert torch.equal(l_on["loss_g"], l_off["loss_g"])
    assert g_on.keys() == g_off.keys() and all(torch.equal(g_on[n], g_off[n]) for n in g_on)
    w = on.distill_weights[1], on.dmd_weights[1], on.adv_weights[1]
    torch.testing.assert_close(l_on["loss_g"], w[0] * l_on["distill"] + w[1] * l_on["dmd"] + w[2] * l_on["adv"])
