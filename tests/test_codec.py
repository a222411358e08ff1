
import pytest
import torch

from xfusion.codec import build_codec
from xfusion.config import ImageCodecConfig


def test_pixel_shuffle_round_trip_is_exact_and_scaled():
    cfg = ImageCodecConfig(kind="pixel_shuffle", downsample=4, latent_channels=48,
                           scaling_factor=2.0, shift_factor=0.25)
    codec = build_codec(cfg)
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = codec.encode(pixels)
    assert latents.shape == (2, 48, 8, 8) == (2, *codec.latent_shape(32))
    # space-to-depth: channel c*16 + i*4 + j of latent cell (y, x) is pixel (c, 4y+i, 4x+j)
    assert latents[1, 1 * 16 + 2 * 4 + 3, 5, 6] == (pixels[1, 1, 22, 27] - 0.25) * 2.0
    assert torch.allclose(codec.decode(latents), pixels, atol=1e-6, rtol=0)
    assert codec.encode_calls == 1


def test_pixel_shuffle_rejects_inconsistent_channels():
    with pytest.raises(ValueError, match="latent_channels"):
        build_codec(ImageCodecConfig(kind="pixel_shuffle", downsample=4, latent_channels=4))


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory) -> str:
    """A randomly initialised 2x-down AutoencoderKL saved in diffusers' layout (subfolder vae)."""
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8),
                        layers_per_block=1, norm_num_groups=4, sample_size=16,
                        scaling_factor=0.5)
    root = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(root / "vae")
    return str(root)


def vae_config(path: str, **kw) -> ImageCodecConfig:
    return ImageCodecConfig(**{**dict(kind="autoencoder_kl", path=path, subfolder="vae",
                                      downsample=2, latent_channels=4, scaling_factor=0.5), **kw})


def test_autoencoder_kl_encodes_posterior_mean_scaled(tiny_vae_dir):
    codec = build_codec(vae_config(tiny_vae_dir, shift_factor=0.1))
    pixels = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = codec.encode(pixels)
    assert latents.shape == (2, 4, 8, 8)
    mean = codec.vae.encode(pixels).latent_dist.mean
    assert torch.allclose(latents, (mean - 0.1) * 0.5, atol=1e-6)
    assert torch.equal(latents, codec.encode(pixels))  # the mean, not a sample
    decoded = codec.decode(latents)
    assert decoded.shape == pixels.shape
    assert torch.allclose(decoded, codec.vae.decode(mean).sample, atol=1e-5)
    assert codec.encode_calls == 2


def test_autoencoder_kl_rejects_config_that_mismatches_checkpoint(tiny_vae_dir):
    with pytest.raises(ValueError, match="downsample"):
        build_codec(vae_config(tiny_vae_dir, downsample=8))
    with pytest.raises(ValueError, match="scaling_factor"):
        build_codec(vae_config(tiny_vae_dir, scaling_factor=0.18215))
