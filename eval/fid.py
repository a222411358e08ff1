"""FID between generated images and a reference set, with torch-fidelity.

References:
- Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
  Equilibrium", NeurIPS 2017 (FID).
- Obukhov et al., torch-fidelity (github.com/toshas/torch-fidelity): `calculate_metrics`,
  the `inception-v3-compat` extractor that reproduces the TF reference implementation, its
  statistics cache (`cache_root`, `input2_cache_name`) and `register_feature_extractor`.

Feature extractor (`evaluation.fid_extractor`):
- paper scale: `inception-v3-compat`, weights from `evaluation.fid_weights` when set (offline
  clusters), else torch-fidelity's own download. Any other torch-fidelity extractor name works.
- tiny scale: `judge_clip`, the image tower of the CLIP judge (`eval.judges`), registered with
  torch-fidelity as `xfusion-judge-clip`. Inception has never seen 32-px coloured shapes, and
  cannot be downloaded offline; the judge's projected image embedding (unnormalised, like
  torch-fidelity's own `clip-*` extractors) knows exactly the attributes the world varies.
  Values are therefore "FID_CLIP-judge", comparable across runs, not with published FIDs.

Reference statistics are computed once per (reference set, extractor) and cached under --cache;
the cache name carries a digest of the reference files (names, sizes, mtimes) and of the
extractor's weights, so regenerated references or a retrained judge never reuse stale statistics.

    python -m eval.fid --config C --generated R/samples/RUN/STEP/t2i \
        --reference R/world/heldout/images --cache R/fid_ref [--judges R/judges] \
        --run RUN --step STEP --out R/metrics/RUN/STEP/fid.json
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
import torch_fidelity
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor
from transformers import AutoProcessor, CLIPModel

from eval.common import load_config, metric_parser, resolve_evaluator, write_metric

JUDGE_EXTRACTOR = "xfusion-judge-clip"
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg")


class JudgeCLIPFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity extractor over a transformers CLIPModel directory: uint8 (B, 3, H, W)
    -> projected image embedding (B, projection_dim). The directory comes in torch-fidelity's
    `feature_extractor_weights_path` argument, the slot its own extractors use for weights."""

    FEATURE = "clip_image_embeds"

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise ValueError(f"{name}: pass feature_extractor_weights_path=<CLIP model dir>")
        self.model = CLIPModel.from_pretrained(feature_extractor_weights_path).eval()
        images = AutoProcessor.from_pretrained(feature_extractor_weights_path).image_processor
        self.resolution = self.model.config.vision_config.image_size
        self.register_buffer("mean", 255 * torch.tensor(images.image_mean).view(1, 3, 1, 1))
        self.register_buffer("std", 255 * torch.tensor(images.image_std).view(1, 3, 1, 1))

    @staticmethod
    def get_provided_features_list():
        return (JudgeCLIPFeatureExtractor.FEATURE,)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return JudgeCLIPFeatureExtractor.FEATURE

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return (torch.rand([1, 3, 4, 4]) * 255).to(torch.uint8)

    def forward(self, x: torch.Tensor):
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected uint8 (B, 3, H, W) images, got {x.dtype} {tuple(x.shape)}")
        x = x.float()
        if x.shape[-2:] != (self.resolution, self.resolution):
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear",
                              align_corners=False, antialias=True)
        out = self.model.get_image_features(pixel_values=(x - self.mean) / self.std)
        out = out if torch.is_tensor(out) else out.pooler_output  # (B, projection_dim)
        return (out.float(),)


if JUDGE_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
    register_feature_extractor(JUDGE_EXTRACTOR, JudgeCLIPFeatureExtractor)


def image_files(folder: str | Path) -> list[Path]:
    files = sorted(p for p in Path(folder).iterdir()
                   if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)
    if len(files) < 2:
        raise SystemExit(f"{folder}: FID needs at least 2 images, found {len(files)}")
    return files


def digest(paths: list[Path], contents: bool = False) -> str:
    """Short sha256 of files' names, sizes and mtimes (or, with `contents`, their bytes)."""
    h = hashlib.sha256()
    for p in paths:
        st = p.stat()
        stamp = f"{p.name}:{st.st_size}:{st.st_mtime_ns};".encode()
        h.update(p.read_bytes() if contents else stamp)
    return h.hexdigest()[:12]


def compute_fid(generated: str | Path, reference: str | Path, extractor: str,
                weights: str | None = None, cache: str | Path | None = None,
                batch_size: int = 64) -> float:
    """FID(generated folder, reference folder) with a torch-fidelity extractor name (or
    JUDGE_EXTRACTOR with `weights` = a CLIP model dir). Reference statistics cached in `cache`."""
    ref_files = image_files(reference)
    image_files(generated)
    if extractor == JUDGE_EXTRACTOR:
        model_files = sorted(Path(weights).glob("*.safetensors"))
        ext_id = f"{extractor}-{digest(model_files, contents=True)}"
    else:
        ext_id = extractor + (f"-{digest([Path(weights)])}" if weights else "")
    kwargs = dict(input1=str(generated), input2=str(reference), fid=True,
                  feature_extractor=extractor, feature_extractor_weights_path=weights,
                  cuda=torch.cuda.is_available(), batch_size=batch_size,
                  save_cpu_ram=True,  # no DataLoader worker processes: the CPU is shared
                  samples_find_ext=",".join(IMAGE_EXTENSIONS), verbose=True)
    if cache is not None:
        kwargs |= dict(cache=True, cache_root=str(cache),
                       input2_cache_name=f"{Path(reference).name}-{digest(ref_files)}-{ext_id}")
    else:
        kwargs |= dict(cache=False)
    return float(torch_fidelity.calculate_metrics(**kwargs)["frechet_inception_distance"])


def main(argv: list[str] | None = None) -> dict:
    p = metric_parser(__doc__.split("\n")[0])
    p.add_argument("--generated", required=True, help="folder of generated PNGs")
    p.add_argument("--reference", required=True, help="folder of reference images")
    p.add_argument("--cache", default=None, help="where reference statistics are cached")
    args = p.parse_args(argv)
    cfg = load_config(args)
    e = cfg.evaluation
    if e.fid_extractor == "judge_clip":
        extractor, weights = JUDGE_EXTRACTOR, resolve_evaluator("judge_clip", args.judges)
    else:
        extractor, weights = e.fid_extractor, e.fid_weights
    value = compute_fid(args.generated, args.reference, extractor, weights, args.cache,
                        args.batch_size)
    return write_metric(args.out, "fid", value, cfg=cfg, job="fid", run=args.run,
                        step=args.step, n=len(image_files(args.generated)),
                        details={"extractor": e.fid_extractor, "weights": weights,
                                 "n_reference": len(image_files(args.reference))})


if __name__ == "__main__":
    main()
