"""Pixels <-> latents: the image space the flow-matching loss lives in.

`build_codec(cfg.model.codec) -> ImageCodec`; `encode(pixels)` maps (B, 3, H, W) pixels in
[-1, 1] to (B, C, H/d, W/d) latents already shifted and scaled, `decode(latents)` inverts it.

Kinds (`model.codec.kind`):
  pixel_shuffle   tiny scale: exact space-to-depth (pixel_unshuffle by `downsample`, 3*d*d
                  channels), no parameters; a pretrained VAE cannot be had offline and an
                  untrained one would only add noise. decode(encode(x)) == x up to float rounding.
  autoencoder_kl  paper scale: diffusers' AutoencoderKL (the SD-1.5 VAE, 8x down, 4 channels).
                  Encoding takes the posterior mean, not a sample: latents are computed once and
                  stored (DESIGN: "encode the dataset once"), so a sample would freeze one noise
                  draw into every epoch while adding nothing the flow-matching noise does not.

Latents are `(z - shift_factor) * scaling_factor`, as diffusers' SD3/SD pipelines do, so the
model sees roughly unit-variance inputs. `encode_calls` counts encoder calls: training must read
stored latents, and a benchmark asserts it stays 0.

References: Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models";
diffusers `AutoencoderKL`, `StableDiffusion3Pipeline` (scaling/shift of latents).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from xfusion.config import ImageCodecConfig


class ImageCodec(nn.Module):
    """Base: scaling/shift, the encoder-call counter and shape bookkeeping."""

    def __init__(self, cfg: ImageCodecConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.downsample = cfg.downsample
        self.latent_channels = cfg.latent_channels
        self.scaling_factor = cfg.scaling_factor
        self.shift_factor = cfg.shift_factor
        self.encode_calls = 0

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        """(C, h, w) of one image's latents."""
        side = image_size // self.downsample
        return (self.latent_channels, side, side)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, C, H/d, W/d), shifted and scaled."""
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"encode expects pixels (B, 3, H, W), got {tuple(pixels.shape)}")
        if pixels.shape[-1] % self.downsample or pixels.shape[-2] % self.downsample:
            raise ValueError(f"image size {tuple(pixels.shape[-2:])} is not a multiple of "
                             f"model.codec.downsample = {self.downsample}")
        self.encode_calls += 1
        z = self._encode(pixels)
        return (z - self.shift_factor) * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) shifted and scaled latents -> (B, 3, h*d, w*d) pixels."""
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"decode expects latents (B, {self.latent_channels}, h, w), got "
                             f"{tuple(latents.shape)}")
        return self._decode(latents / self.scaling_factor + self.shift_factor)

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class PixelShuffleCodec(ImageCodec):
    """Exact, parameter-free space-to-depth: (B, 3, H, W) <-> (B, 3*d*d, H/d, W/d)."""

    def __init__(self, cfg: ImageCodecConfig) -> None:
        super().__init__(cfg)
        if 3 * cfg.downsample**2 != cfg.latent_channels:
            raise ValueError(f"config.model.codec: pixel_shuffle with downsample = "
                             f"{cfg.downsample} makes {3 * cfg.downsample**2} channels but "
                             f"latent_channels = {cfg.latent_channels}; set latent_channels to "
                             f"3 * downsample**2")

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle(pixels, self.downsample)  # (B, 3, H, W) -> (B, 3d², H/d, W/d)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(z, self.downsample)  # (B, 3d², h, w) -> (B, 3, h·d, w·d)


class AutoencoderKLCodec(ImageCodec):
    """diffusers' AutoencoderKL, frozen; encode = posterior mean."""

    def __init__(self, cfg: ImageCodecConfig) -> None:
        super().__init__(cfg)
        from diffusers import AutoencoderKL

        if not cfg.path:
            raise ValueError("config.model.codec.path: autoencoder_kl needs a local path or hub "
                             "id (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5, subfolder vae)")
        kwargs = {"subfolder": cfg.subfolder} if cfg.subfolder else {}
        self.vae = AutoencoderKL.from_pretrained(cfg.path, **kwargs).eval().requires_grad_(False)
        vae_cfg = self.vae.config
        down = 2 ** (len(vae_cfg.block_out_channels) - 1)
        if (down, vae_cfg.latent_channels) != (cfg.downsample, cfg.latent_channels):
            raise ValueError(f"config.model.codec: {cfg.path} downsamples {down}x to "
                             f"{vae_cfg.latent_channels} channels, but downsample = "
                             f"{cfg.downsample}, latent_channels = {cfg.latent_channels}")
        if abs(vae_cfg.scaling_factor - cfg.scaling_factor) > 1e-6:
            raise ValueError(f"config.model.codec.scaling_factor = {cfg.scaling_factor} but "
                             f"{cfg.path} was trained with {vae_cfg.scaling_factor}; use that")

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(device=self.vae.device, dtype=self.vae.dtype)
        return self.vae.encode(pixels).latent_dist.mean.float()

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        z = z.to(device=self.vae.device, dtype=self.vae.dtype)
        return self.vae.decode(z).sample.float()


CODECS = {"pixel_shuffle": PixelShuffleCodec, "autoencoder_kl": AutoencoderKLCodec}


def build_codec(cfg: ImageCodecConfig) -> ImageCodec:
    if cfg.kind not in CODECS:
        raise ValueError(f"config.model.codec.kind = {cfg.kind!r}: must be one of "
                         f"{', '.join(CODECS)}")
    return CODECS[cfg.kind](cfg)
