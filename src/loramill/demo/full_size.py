"""Full-size architectures' layer sizes, for benchmarks and for module counts on the meta device.

``SD15`` feeds ``loramill.demo.tiny_models.sd_pipeline`` (with ``CLIP_TEXT``'s token ids);
``SDXL`` holds the keyword arguments of diffusers' ``UNet2DConditionModel`` and
``AutoencoderKL`` and of the two transformers ``CLIPTextConfig`` of Stable Diffusion XL base 1.0
(it feeds ``loramill.demo.tiny_sdxl.sdxl_pipeline``). ``FLUX_DEV``, ``FLUX_SCHNELL`` and
``CHROMA`` hold the keyword arguments of diffusers' ``FluxTransformer2DModel`` and
``ChromaTransformer2DModel`` for FLUX.1 [dev], FLUX.1 [schnell] and Chroma, ``FLUX_VAE`` those of
their autoencoder.
"""

# Stable Diffusion 1.5's layer sizes (UNet 859.5 M, VAE 83.7 M, CLIP-L 123.1 M parameters);
# UNet2DConditionModel's default block layout is SD1.5's.
SD15 = {
    "unet": {
        "sample_size": 64,
        "block_out_channels": (320, 640, 1280, 1280),
        "layers_per_block": 2,
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
    },
    "vae": {
        "block_out_channels": (128, 256, 512, 512),
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "latent_channels": 4,
        "layers_per_block": 2,
        "sample_size": 512,
    },
    "text_encoder": {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "hidden_act": "quick_gelu",
        "projection_dim": 768,
    },
}
# Stable Diffusion XL base 1.0's (UNet 2567.5 M parameters; text encoders CLIP ViT-L, 123.1 M,
# and OpenCLIP ViT-bigG with its projection, 694.7 M; the VAE is SD's layout with its own
# latent scale).
SDXL = {
    "unet": {
        "sample_size": 128,
        "block_out_channels": (320, 640, 1280),
        "layers_per_block": 2,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "transformer_layers_per_block": (1, 2, 10),
        "cross_attention_dim": 2048,
        "attention_head_dim": (5, 10, 20),
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,
    },
    "vae": {**SD15["vae"], "sample_size": 1024, "scaling_factor": 0.13025},
    "text_encoder": SD15["text_encoder"],
    "text_encoder_2": {
        "hidden_size": 1280,
        "intermediate_size": 5120,
        "num_hidden_layers": 32,
        "num_attention_heads": 20,
        "hidden_act": "gelu",
        "projection_dim": 1280,
    },
}

# FLUX.1's MMDiT transformer (11.9 G parameters): 19 double-stream and 38 single-stream blocks,
# 3072 wide (24 heads of 128), on T5-XXL's 4096-wide states and CLIP-L's 768-wide pooled output;
# 64 input features (16 latent channels packed 2 × 2). [dev] embeds a guidance scale, [schnell]
# does not. Chroma prunes the blocks' modulation layers for one approximator and drops CLIP.
FLUX = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "axes_dims_rope": (16, 56, 56),
}
FLUX_DEV = {**FLUX, "pooled_projection_dim": 768, "guidance_embeds": True}
FLUX_SCHNELL = {**FLUX, "pooled_projection_dim": 768, "guidance_embeds": False}
CHROMA = {
    **FLUX,
    "approximator_num_channels": 64,
    "approximator_hidden_dim": 5120,
    "approximator_layers": 5,
}
# FLUX.1's autoencoder (Chroma's too): SD's layout with 16 latent channels, its own latent scale
# and shift, no quant convs.
FLUX_VAE = {
    **SD15["vae"],
    "latent_channels": 16,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
