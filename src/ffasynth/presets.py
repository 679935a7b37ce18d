"""The presets: plain override dictionaries applied on top of the config's defaults (which are
SD1.5's). `tiny` is the CPU-scale model (its shipped base model, small U-Net/VAE/CLIP, CPU-sized loops);
`sd15` is the paper's scale. Pure data: config.py reads it, nothing here imports."""

from __future__ import annotations

from typing import Any

# channels_last: +16% stage-1 steps/s on 2 CPU cores (benchmarks/bench_train.py)
_TINY_LOOP = {"batch_size": 8, "save_every": 100, "sample_every": 100, "log_every": 10, "channels_last": True}
# Presets are plain override dictionaries applied on top of the defaults (which are SD1.5's).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "data": {"crop_size": 128},
        "model": {
            # the shipped base model (ffasynth base build; model.base=none: random init, for ablations)
            "base": "tiny",
            "allow_random_init": True,
            "unet_channels": [32, 64, 64],
            "unet_layers_per_block": 1,
            "unet_attention_heads": 2,
            "unet_norm_groups": 8,
            "cross_attention_dim": 64,
            "vae_channels": [16, 32, 64],
            "vae_layers_per_block": 1,
            "vae_norm_groups": 8,
            "clip_hidden_size": 64,
            "clip_layers": 2,
            "clip_heads": 4,
            "clip_intermediate_size": 128,
            "clip_patch_size": 8,
            "clip_image_size": 64,
        },
        "vae": {**_TINY_LOOP, "batch_size": 2, "max_steps": 600, "lr": 1e-3, "lr_warmup_steps": 10},
        # v-prediction: at high noise the target is ≈ −x0, so a small model learns the photo → FFA mapping in a
        # few hundred CPU steps (ε-prediction left samples as texture after 600 steps on phantoms)
        "stage1": {
            **_TINY_LOOP,
            "max_steps": 600,
            "lr": 5e-4,
            "lr_warmup_steps": 50,
            "ema_decay": 0.99,
            # fine-tuning the base: half of each epoch's crops are its own procedural pairs. On two real UWF eyes
            # a few hundred steps otherwise trade its photo-following for input-blind grey (README, issue 20)
            "rehearsal": 0.5,
            "prediction_type": "v_prediction",
            # after ~300 CPU steps the one-step x0 estimate already follows the photo's vessels, but
            # unguided sampling drifts into texture; guidance brings the vessel tree back (phantoms: 3-5 alike).
            # 5, not 3: ahead on the demo's phantoms at 20 steps (SSIM 0.386 vs 0.381), level at 4; on the UWF
            # folds decoded whole the two tie (the earlier fold lead came from decode tiles; README)
            "image_guidance_scale": 5.0,
            # 4 guided DPM-Solver++ steps (8 U-Net passes) are within 0.3 dB / 0.01 SSIM of 20 on the demo's
            # phantoms and the shared UWF test eyes, 5x fewer passes (benchmarks/few_step.py, README "Fewer passes")
            "inference_steps": 4,
        },
        # lpips_weight 0: the tiny preset runs with no downloaded weights (LPIPS needs VGG16).
        # On the shared UWF pairs at 2e-4 the raw decoder's test L1 swung by ±30% from one checkpoint to
        # the next and adv_weight 0.5 raised the training L1 by 45% once the discriminator started; the EMA
        # (what is saved and exported) and a 0.1 adversarial weight keep the gain (see README, stage 2)
        "stage2": {
            **_TINY_LOOP,
            "batch_size": 4,
            "max_steps": 300,
            "lr": 2e-4,
            "lr_warmup_steps": 20,
            "ema_decay": 0.98,
            "disc_start": 100,
            "adv_weight": 0.1,
            "lpips_weight": 0.0,
            "disc_channels": 16,
        },
        # the student is a whole copy of the tiny U-Net (LoRA adapters are for SD1.5's size)
        "distill": {**_TINY_LOOP, "max_steps": 400, "lr": 2e-4, "lr_warmup_steps": 20, "preview_channels": 32},
        "pix2pix": {
            **_TINY_LOOP,
            "batch_size": 4,
            "max_steps": 600,
            "ngf": 16,
            "num_downs": 6,
            "disc_channels": 16,
            "tile": 256,
            "tile_overlap": 32,
        },
    },
    # The paper's scale (SD1.5 U-Net + VAE, CLIP ViT-L/14, 768² crops); the weights are named by the user
    # (configs/sd15.yaml, or model.pretrained= / model.image_encoder=), so `--preset sd15` and that file train alike.
    "sd15": {
        "data": {"crop_size": 768},
        "model": {"use_clip": True, "use_concat": True, "clip_tokens": "embed", "clip_view": "tile"},
        "stage1": {
            "lr": 1e-5,
            "batch_size": 1,
            "gradient_accumulation": 4,
            "max_steps": 20000,
            "offset_noise_strength": 0.1,
            "mixed_precision": "bf16",
            "gradient_checkpointing": True,
            "save_every": 1000,
            "sample_every": 500,
        },
        "stage2": {  # the decoder's GAN training in fp32; the frozen U-Net and CLIP that make its latents in bf16
            "lr": 1e-5,
            "batch_size": 1,
            "gradient_accumulation": 4,
            "max_steps": 5000,
            "mixed_precision": "no",
            "gradient_checkpointing": True,
            "frozen_dtype": "bf16",
            "disc_start": 1000,
            "lpips_weight": 1.0,
        },
        "distill": {  # LCM-LoRA's size: rank-64 adapters over the frozen stage-1 U-Net
            "method": "lcm",
            "lora": {"rank": 64},
            "lr": 1e-4,
            "batch_size": 4,
            "max_steps": 4000,
            "mixed_precision": "bf16",
            "gradient_checkpointing": True,
            "preview_channels": 64,
            "save_every": 500,
            "sample_every": 500,
        },
    },
}
