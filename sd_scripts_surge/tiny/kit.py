"""Build the tiny offline kit: tokenizers, dataset, a `base` and a `teacher` SDXL diffusers folder.

Recipe (all seeded, single-threaded, deterministic algorithms on):
1. tokenizers: CLIP BPE learned from the caption vocabulary (tokenizer.py);
2. dataset: procedural shapes with captions (dataset.py);
3. VAE: set (not trained) to an 8×8 average-colour encoder / nearest-neighbour decoder inside the real
   AutoencoderKL modules (init_vae_as_pixel_codec), then its latent space is rescaled (quant_conv × c,
   post_quant_conv × 1/c: decoded images do not change) so that latents × 0.13025 — SDXL's scaling
   factor, kept in the config — have unit standard deviation;
4. text encoders: random from fixed seeds, frozen (TE1 pads with EOS, TE2 with "!", as SDXL);
5. base UNet: trained briefly on the images with one generic caption (knows "shapes", not words);
6. teacher UNet: base trained further on the real captions (10 % caption dropout for CFG) with the
   ε-prediction denoising loss on SDXL's DDPM schedule and SDXL conditioning.
The student for distillation is `base`. The eval numbers (held-out denoising MSE of base and teacher,
and of the teacher given wrong captions) are stored in the stamp file.

The kit lives in one directory (default `$SURGE_CACHE_DIR/tiny-v1`, else `~/.cache/sd-scripts-surge/tiny-v1`),
built in a temp directory beside it and renamed into place when complete; `tiny_kit.json` (the stamp)
holds the kit version, a hash of the recipe and the size of every file, so a stale, foreign or partly
deleted kit is rebuilt rather than used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from sd_scripts_surge.models.text import encode_prompts_sdxl
from sd_scripts_surge.tiny.architecture import (
    build_tiny_text_encoders,
    build_tiny_unet,
    build_tiny_vae,
    tiny_te1_config,
    tiny_te2_config,
    tiny_unet_config,
    tiny_vae_config,
)
from sd_scripts_surge.tiny.dataset import caption_vocabulary, load_manifest, make_dataset
from sd_scripts_surge.tiny.tokenizer import EOS_TOKEN, TE2_PAD_TOKEN, build_tokenizer

KIT_VERSION = "tiny-v1"
STAMP_NAME = "tiny_kit.json"
GENERIC_CAPTION = "a picture of a shape"
SDXL_BETA_START, SDXL_BETA_END, NUM_TRAIN_TIMESTEPS = 0.00085, 0.012, 1000


@dataclass(frozen=True)
class KitRecipe:
    """Everything that decides the kit's bytes. Its hash is part of the stamp."""

    seed: int = 0
    num_shapes: int = 48  # 64×64 images in train/10_shapes
    num_mixed: int = 16  # 64×64 / 64×48 / 48×64 images in train/5_mixed
    num_eval: int = 16  # held-out captions + images in eval/
    base_steps: int = 60
    teacher_steps: int = 180
    unet_batch: int = 16
    unet_lr: float = 2e-3
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0  # kohya's --min_snr_gamma: less weight on the easy, high-SNR timesteps
    eval_timesteps: int = 10


FULL_RECIPE = KitRecipe()
# A reduced kit for tests: same code path and layout, a fraction of the steps (~10-25 s on 1 core).
QUICK_RECIPE = KitRecipe(num_shapes=24, num_mixed=6, num_eval=6, base_steps=10, teacher_steps=35, unet_batch=8,
                         eval_timesteps=6)


@dataclass(frozen=True)
class TinyKitPaths:
    root: Path
    base_dir: Path  # diffusers SDXL folder; also the distillation student
    teacher_dir: Path  # diffusers SDXL folder, UNet trained on the captions
    dataset_dir: Path
    train_data_dir: Path  # kohya folder form: NN_name subfolders
    dataset_toml: Path
    prompts_file: Path  # held-out captions, one a line
    eval_dir: Path  # held-out images + captions
    tokenizer_dir: Path
    tokenizer_2_dir: Path
    stamp_file: Path
    metrics: dict = field(default_factory=dict)

    @property
    def student_dir(self) -> Path:
        return self.base_dir

    @classmethod
    def under(cls, root: Path, metrics: dict | None = None) -> TinyKitPaths:
        dataset = root / "dataset"
        return cls(
            root=root,
            base_dir=root / "base",
            teacher_dir=root / "teacher",
            dataset_dir=dataset,
            train_data_dir=dataset / "train",
            dataset_toml=dataset / "dataset.toml",
            prompts_file=dataset / "prompts.txt",
            eval_dir=dataset / "eval",
            tokenizer_dir=root / "base" / "tokenizer",
            tokenizer_2_dir=root / "base" / "tokenizer_2",
            stamp_file=root / STAMP_NAME,
            metrics=metrics or {},
        )


def default_cache_dir() -> Path:
    root = os.environ.get("SURGE_CACHE_DIR") or Path.home() / ".cache" / "sd-scripts-surge"
    return Path(root).expanduser() / KIT_VERSION


def recipe_hash(recipe: KitRecipe) -> str:
    """Hash of the recipe, the architecture configs and the kit's own source: change any and kits are rebuilt."""
    here = Path(__file__).parent
    sources = {name: hashlib.sha256((here / name).read_bytes()).hexdigest()
               for name in ("architecture.py", "dataset.py", "kit.py", "tokenizer.py")}
    facts = {
        "version": KIT_VERSION,
        "sources": sources,
        "recipe": asdict(recipe),
        "unet": tiny_unet_config(),
        "vae": tiny_vae_config(),
        "te1": tiny_te1_config().to_dict(),
        "te2": tiny_te2_config().to_dict(),
    }
    for key in ("te1", "te2"):  # version strings written by transformers are not part of the recipe
        facts[key].pop("transformers_version", None)
    blob = json.dumps(facts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------
# determinism


@contextlib.contextmanager
def deterministic(threads: int = 1) -> Iterator[None]:
    """One thread and deterministic kernels while building; the caller's settings come back afterwards.

    One thread because float sums depend on how work is split: the same torch build then gives the same
    kit on every machine, and on shared 2-core machines one thread is also the fastest.
    """
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)


# ----------------------------------------------------------------------------------------------------------
# data helpers


def load_image_tensor(path: Path) -> torch.Tensor:
    """PNG → (3, H, W) float in [-1, 1]."""
    array = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


def _load_split(dataset_dir: Path, split: str) -> list[tuple[torch.Tensor, str]]:
    items = [i for i in load_manifest(dataset_dir) if i.image.startswith(split + "/")]
    return [(load_image_tensor(dataset_dir / i.image), i.caption) for i in items]


def sdxl_noise_schedule() -> torch.Tensor:
    """alphas_cumprod of SDXL's DDPM schedule: scaled_linear betas 0.00085..0.012 over 1000 steps."""
    betas = torch.linspace(SDXL_BETA_START**0.5, SDXL_BETA_END**0.5, NUM_TRAIN_TIMESTEPS, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


# ----------------------------------------------------------------------------------------------------------
# text conditioning


class PromptEncoder:
    """SDXL conditioning from the two tiny text encoders: context = concat(TE1, TE2 penultimate), pooled = TE2
    projection. Embeddings are cached per caption (the encoders are frozen during the kit build)."""

    def __init__(self, tokenizer_1, tokenizer_2, te1: torch.nn.Module, te2: torch.nn.Module) -> None:
        self.tokenizers = (tokenizer_1, tokenizer_2)
        self.te1, self.te2 = te1.eval(), te2.eval()
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def _encode_one(self, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
        context, pooled = encode_prompts_sdxl([caption], self.tokenizers, (self.te1, self.te2))
        return context[0], pooled[0]

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        for caption in captions:
            if caption not in self._cache:
                self._cache[caption] = self._encode_one(caption)
        contexts, pooled = zip(*(self._cache[c] for c in captions))
        return torch.stack(contexts), torch.stack(pooled)


def time_ids_for(height: int, width: int, batch: int) -> torch.Tensor:
    """SDXL size/crop conditioning (original size, crop top-left, target size) for uncropped images."""
    return torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32).expand(batch, 6)


# ----------------------------------------------------------------------------------------------------------
# VAE


@torch.no_grad()
def init_vae_as_pixel_codec(vae, *, constant: float = 50.0, shift: float = 10.0) -> None:
    """Set the AutoencoderKL's weights so it encodes 8×8 average colours and decodes them nearest-neighbour.

    Why not train it: on 2 shared cores a from-scratch autoencoder needs far more steps than the kit's
    budget to get past "predict the mean colour". The construction keeps every module of the real
    architecture in the path, exactly:
    - every ResNet / attention residual branch outputs 0 (conv2 / to_out zeroed), so blocks pass through;
    - downsamplers average 2×2 (kernel taps [0:2, 0:2] = 1/4), upsamplers' convs are the identity;
    - the stream carries (R, G, B, −(R+G+B), +K, −K, 0…): channels sum to 0 at every pixel, so the final
      one-group GroupNorm has mean 0 and std ≈ K·√(2/C) whatever the image (signal² ≪ K²), i.e. it is
      linear; its affine undoes the scale and adds `shift` so the SiLU after it is ≈ identity, and the
      output conv subtracts the shift again.
    Latent channels: R, G, B and their mean. Residual branches stay zero-initialised for later training.
    """
    if vae.config.norm_num_groups != 1:
        raise ValueError(f"the pixel codec needs norm_num_groups=1 in the VAE config, got {vae.config.norm_num_groups}")
    for module in vae.modules():
        kind = type(module).__name__
        if kind == "ResnetBlock2D":
            module.conv2.weight.zero_()
            module.conv2.bias.zero_()
            if module.conv_shortcut is not None:
                _identity_conv(module.conv_shortcut)
        elif kind == "Attention":
            module.to_out[0].weight.zero_()
            module.to_out[0].bias.zero_()
        elif kind == "Downsample2D":
            module.conv.weight.zero_()
            module.conv.bias.zero_()
            for c in range(module.conv.weight.shape[0]):
                module.conv.weight[c, c, 0:2, 0:2] = 0.25
        elif kind == "Upsample2D":
            _identity_conv(module.conv)

    def stream_in(conv: torch.nn.Conv2d) -> None:
        conv.weight.zero_()
        conv.bias.zero_()
        for rgb in range(3):
            conv.weight[rgb, rgb, 1, 1] = 1.0
            conv.weight[3, rgb, 1, 1] = -1.0
        conv.bias[4], conv.bias[5] = constant, -constant

    def stream_out(norm: torch.nn.GroupNorm, conv: torch.nn.Conv2d, rows: list[list[float]]) -> None:
        norm.weight.zero_()
        norm.bias.zero_()
        norm.weight[:3] = constant * math.sqrt(2.0 / norm.num_channels)
        norm.bias[:3] = shift
        conv.weight.zero_()
        conv.bias.zero_()
        for out, coeffs in enumerate(rows):
            for channel, coeff in enumerate(coeffs):
                conv.weight[out, channel, 1, 1] = coeff
                conv.bias[out] -= coeff * shift

    enc, dec = vae.encoder, vae.decoder
    stream_in(enc.conv_in)
    stream_out(enc.conv_norm_out, enc.conv_out, [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1 / 3, 1 / 3, 1 / 3]])
    enc.conv_out.bias[vae.config.latent_channels :] = -12.0  # log-variance: a near-deterministic posterior
    _identity_conv(vae.quant_conv)
    _identity_conv(vae.post_quant_conv)
    stream_in(dec.conv_in)
    stream_out(dec.conv_norm_out, dec.conv_out, [[1, 0, 0], [0, 1, 0], [0, 0, 1]])


def _identity_conv(conv: torch.nn.Conv2d) -> None:
    """Channel i → channel i (centre tap), zero bias; extra output channels get 0."""
    conv.weight.zero_()
    conv.bias.zero_()
    centre = conv.kernel_size[0] // 2
    for c in range(min(conv.in_channels, conv.out_channels)):
        conv.weight[c, c, centre, centre] = 1.0


@torch.no_grad()
def rescale_vae_latents(vae, images: list[torch.Tensor]) -> float:
    """Make latents × scaling_factor have unit std without changing what the VAE decodes.

    quant_conv's mean rows and post_quant_conv's input columns are scaled by c and 1/c (the log-variance
    shifts by 2·ln c), so z' = c·z encodes and decodes exactly as z did. Returns c.
    """
    latents = torch.cat([vae.encode(img[None]).latent_dist.mean.flatten() for img in images])
    c = 1.0 / (float(latents.std()) * vae.config.scaling_factor)
    channels = vae.config.latent_channels
    vae.quant_conv.weight[:channels] *= c
    vae.quant_conv.bias[:channels] *= c
    vae.quant_conv.bias[channels:] += 2.0 * math.log(c)
    vae.post_quant_conv.weight /= c
    return c


@torch.no_grad()
def encode_latents(vae, images: list[torch.Tensor]) -> list[torch.Tensor]:
    """Posterior means × scaling_factor, one (4, h, w) tensor per image."""
    return [vae.encode(img[None]).latent_dist.mean[0] * vae.config.scaling_factor for img in images]


# ----------------------------------------------------------------------------------------------------------
# UNet


def _warmup_cosine(opt: torch.optim.Optimizer, total: int, warmup: int = 10) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _size_groups(latents: list[torch.Tensor]) -> dict[tuple[int, int], list[int]]:
    """Indices by latent size: a batch holds one size only (what bucketing does in the trainer)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for index, latent in enumerate(latents):
        groups.setdefault(tuple(latent.shape[1:]), []).append(index)
    return dict(sorted(groups.items()))


def unet_forward(unet, noisy: torch.Tensor, t: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor):
    h, w = noisy.shape[2] * 8, noisy.shape[3] * 8
    added = {"text_embeds": pooled, "time_ids": time_ids_for(h, w, noisy.shape[0])}
    return unet(noisy, t, encoder_hidden_states=context, added_cond_kwargs=added).sample


def train_unet(
    unet,
    latents: list[torch.Tensor],
    captions: list[str],
    encode: PromptEncoder,
    *,
    steps: int,
    recipe: KitRecipe,
    seed: int,
    caption_dropout: float,
    desc: str,
    progress: bool,
) -> dict:
    """ε-prediction denoising on SDXL's DDPM schedule; batches drawn from one latent size at a time."""
    gen = torch.Generator().manual_seed(seed)
    alphas = sdxl_noise_schedule()
    groups = _size_groups(latents)
    sizes = list(groups)
    weights = torch.tensor([len(groups[s]) for s in sizes], dtype=torch.float64)
    unet.train()
    opt = torch.optim.AdamW(unet.parameters(), lr=recipe.unet_lr, weight_decay=0.01)
    sched = _warmup_cosine(opt, steps)
    losses = []
    for _ in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
        size = sizes[int(torch.multinomial(weights, 1, generator=gen))]
        members = groups[size]
        picks = [members[i] for i in torch.randint(len(members), (recipe.unet_batch,), generator=gen).tolist()]
        x0 = torch.stack([latents[i] for i in picks])
        texts = ["" if float(torch.rand(1, generator=gen)) < caption_dropout else captions[i] for i in picks]
        context, pooled = encode(texts)
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(NUM_TRAIN_TIMESTEPS, (x0.shape[0],), generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        per_sample = F.mse_loss(unet_forward(unet, noisy, t, context, pooled), noise, reduction="none")
        snr = a.flatten() / (1 - a.flatten())
        weight = snr.clamp(max=recipe.min_snr_gamma) / snr if recipe.min_snr_gamma > 0 else torch.ones_like(snr)
        loss = (per_sample.mean(dim=(1, 2, 3)) * weight).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    unet.eval()
    tail = losses[-max(1, steps // 5) :]
    return {"final_loss": sum(tail) / len(tail)}


@torch.no_grad()
def denoising_mse(
    unet, latents: list[torch.Tensor], captions: list[str], encode: PromptEncoder, *, num_timesteps: int = 10,
    seed: int = 1234,
) -> float:
    """Mean ε-prediction MSE over each latent × `num_timesteps` evenly spaced timesteps, fixed noise."""
    alphas = sdxl_noise_schedule()
    gen = torch.Generator().manual_seed(seed)
    timesteps = torch.linspace(20, NUM_TRAIN_TIMESTEPS - 20, num_timesteps).round().long()
    total, count = 0.0, 0
    for latent, caption in zip(latents, captions):
        x0 = latent[None].expand(num_timesteps, *latent.shape)
        noise = torch.randn(x0.shape, generator=gen)
        a = alphas[timesteps].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        context, pooled = encode([caption] * num_timesteps)
        pred = unet_forward(unet, noisy, timesteps, context, pooled)
        total += float(F.mse_loss(pred, noise, reduction="sum"))
        count += noise.numel()
    return total / count


# ----------------------------------------------------------------------------------------------------------
# diffusers folders


def sdxl_scheduler_config() -> dict:
    """SDXL's scheduler: Euler over the scaled_linear 0.00085..0.012 DDPM schedule, ε prediction."""
    return dict(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        beta_start=SDXL_BETA_START,
        beta_end=SDXL_BETA_END,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        timestep_spacing="leading",
        steps_offset=1,
        interpolation_type="linear",
        use_karras_sigmas=False,
    )


def _model_index() -> dict:
    import diffusers

    return {
        "_class_name": "StableDiffusionXLPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "force_zeros_for_empty_prompt": True,
        "image_encoder": [None, None],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def write_pipeline_folder(directory: Path, *, unet, vae, te1, te2, tokenizer_dirs: tuple[Path, Path]) -> Path:
    """A diffusers StableDiffusionXLPipeline folder, written component by component."""
    from diffusers import EulerDiscreteScheduler

    directory.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(directory / "unet", safe_serialization=True)
    vae.save_pretrained(directory / "vae", safe_serialization=True)
    te1.save_pretrained(directory / "text_encoder", safe_serialization=True)
    te2.save_pretrained(directory / "text_encoder_2", safe_serialization=True)
    for name, source in zip(("tokenizer", "tokenizer_2"), tokenizer_dirs):
        if (directory / name).resolve() != source.resolve():
            shutil.copytree(source, directory / name)
    EulerDiscreteScheduler(**sdxl_scheduler_config()).save_pretrained(directory / "scheduler")
    (directory / "model_index.json").write_text(json.dumps(_model_index(), indent=2) + "\n")
    return directory


def load_tokenizers(tokenizer_dir: Path, tokenizer_2_dir: Path):
    from transformers import CLIPTokenizer

    return (
        CLIPTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True),
        CLIPTokenizer.from_pretrained(str(tokenizer_2_dir), local_files_only=True),
    )


# ----------------------------------------------------------------------------------------------------------
# the build


def build_kit(
    root: Path, recipe: KitRecipe = FULL_RECIPE, *, progress: bool = True, final_root: Path | None = None
) -> dict:
    """Build every file of the kit into `root` (which should be empty); return the metrics. No stamp.

    `final_root`: where the kit will be renamed to (the dataset TOML holds absolute paths); default `root`.
    """
    timings: dict[str, float] = {}
    start = clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 2)
        clock = now

    paths = TinyKitPaths.under(root)
    with deterministic(), _quiet_transformers(not progress):
        make_dataset(paths.dataset_dir, seed=recipe.seed, num_shapes=recipe.num_shapes,
                     num_mixed=recipe.num_mixed, num_eval=recipe.num_eval,
                     final_dir=TinyKitPaths.under(final_root or root).dataset_dir)
        texts = [" ".join(caption_vocabulary()), GENERIC_CAPTION]
        build_tokenizer(paths.tokenizer_dir, texts=texts, pad_token=EOS_TOKEN)
        build_tokenizer(paths.tokenizer_2_dir, texts=texts, pad_token=TE2_PAD_TOKEN)
        tokenizers = load_tokenizers(paths.tokenizer_dir, paths.tokenizer_2_dir)
        lap("dataset_tokenizers_s")

        train = _load_split(paths.dataset_dir, "train")
        held_out = _load_split(paths.dataset_dir, "eval")
        train_images, train_captions = [x for x, _ in train], [c for _, c in train]
        eval_images, eval_captions = [x for x, _ in held_out], [c for _, c in held_out]

        vae = build_tiny_vae(recipe.seed + 1)
        init_vae_as_pixel_codec(vae)
        metrics: dict = {}
        metrics["vae_latent_rescale"] = rescale_vae_latents(vae, train_images)
        with torch.no_grad():
            recon = [vae.decode(vae.encode(img[None]).latent_dist.mean).sample[0] for img in eval_images]
        metrics["vae_eval_mae"] = float(torch.stack([(r - x).abs().mean() for r, x in zip(recon, eval_images)]).mean())
        train_latents = encode_latents(vae, train_images)
        eval_latents = encode_latents(vae, eval_images)
        lap("vae_s")

        te1, te2 = build_tiny_text_encoders(recipe.seed + 2)
        encode = PromptEncoder(*tokenizers, te1, te2)
        unet = build_tiny_unet(recipe.seed + 3)
        base_stats = train_unet(unet, train_latents, [GENERIC_CAPTION] * len(train_latents), encode,
                                steps=recipe.base_steps, recipe=recipe, seed=recipe.seed + 4, caption_dropout=0.0,
                                desc="tiny kit: base UNet", progress=progress)
        metrics["base_train_loss"] = base_stats["final_loss"]
        write_pipeline_folder(paths.base_dir, unet=unet, vae=vae, te1=te1, te2=te2,
                              tokenizer_dirs=(paths.tokenizer_dir, paths.tokenizer_2_dir))
        metrics["base_eval_mse"] = denoising_mse(unet, eval_latents, eval_captions, encode,
                                                 num_timesteps=recipe.eval_timesteps)
        lap("base_s")

        teacher_stats = train_unet(unet, train_latents, train_captions, encode, steps=recipe.teacher_steps,
                                   recipe=recipe, seed=recipe.seed + 5, caption_dropout=recipe.caption_dropout,
                                   desc="tiny kit: teacher UNet", progress=progress)
        metrics["teacher_train_loss"] = teacher_stats["final_loss"]
        metrics["teacher_eval_mse"] = denoising_mse(unet, eval_latents, eval_captions, encode,
                                                    num_timesteps=recipe.eval_timesteps)
        shuffled = eval_captions[1:] + eval_captions[:1]  # each image paired with another image's caption
        metrics["teacher_eval_mse_wrong_captions"] = denoising_mse(unet, eval_latents, shuffled, encode,
                                                                   num_timesteps=recipe.eval_timesteps)
        paths.teacher_dir.mkdir()
        for name in ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
            shutil.copytree(paths.base_dir / name, paths.teacher_dir / name)
        shutil.copy2(paths.base_dir / "model_index.json", paths.teacher_dir / "model_index.json")
        unet.save_pretrained(paths.teacher_dir / "unet", safe_serialization=True)
        lap("teacher_s")
    timings["total_s"] = round(time.perf_counter() - start, 2)
    return {**{k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items()}, "timings": timings}


@contextlib.contextmanager
def _quiet_transformers(quiet: bool) -> Iterator[None]:
    """transformers draws its own 'Writing model shards' bars; keep them off when progress is off."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if quiet and was_enabled:
            hf_logging.enable_progress_bar()


def _file_sizes(root: Path) -> dict[str, int]:
    return {
        p.relative_to(root).as_posix(): p.stat().st_size
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != STAMP_NAME
    }


def read_stamp(root: Path) -> dict | None:
    try:
        return json.loads((root / STAMP_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def kit_is_valid(root: Path, recipe: KitRecipe = FULL_RECIPE) -> bool:
    """Stamp present, same version and recipe hash, and every recorded file there with its recorded size."""
    stamp = read_stamp(root)
    if not stamp or stamp.get("version") != KIT_VERSION or stamp.get("recipe_hash") != recipe_hash(recipe):
        return False
    files = stamp.get("files")
    if not isinstance(files, dict) or not files:
        return False
    for name, size in files.items():
        path = root / name
        if not path.is_file() or path.stat().st_size != size:
            return False
    return True


@contextlib.contextmanager
def _build_lock(root: Path) -> Iterator[None]:
    """Serialise builds of the same kit between processes (POSIX); elsewhere, builds may race harmlessly."""
    root.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: the rename below still keeps the kit whole
        yield
        return
    with open(root.parent / f".{root.name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


KIT_ENTRIES = {"base", "teacher", "dataset", STAMP_NAME}


def _refuse_foreign_directory(root: Path) -> None:
    """A rebuild replaces `root`: never do that to a directory that is not (a piece of) a kit."""
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"tiny kit: {root} is a file; pass a directory path as cache_dir")
    if root.is_dir():
        foreign = sorted(p.name for p in root.iterdir() if p.name not in KIT_ENTRIES)
        if foreign:
            raise FileExistsError(
                f"tiny kit: {root} holds files that are not part of a tiny kit ({', '.join(foreign[:5])}); "
                "it would be replaced by a rebuild. Pass a new or empty directory as cache_dir."
            )


def ensure_tiny_kit(
    cache_dir: str | Path | None = None,
    *,
    force: bool = False,
    progress: bool = True,
    recipe: KitRecipe = FULL_RECIPE,
) -> TinyKitPaths:
    """Return the kit's paths, building it first if it is missing, stale, incomplete or `force` is set.

    `cache_dir` is the kit directory itself (default: `$SURGE_CACHE_DIR/tiny-v1` or
    `~/.cache/sd-scripts-surge/tiny-v1`). Building happens in a temp directory beside it and is renamed
    into place only when complete.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    root = root.absolute()
    if not force and kit_is_valid(root, recipe):
        return TinyKitPaths.under(root, read_stamp(root).get("metrics", {}))
    with _build_lock(root):
        if not force and kit_is_valid(root, recipe):  # another process built it while we waited
            return TinyKitPaths.under(root, read_stamp(root).get("metrics", {}))
        _refuse_foreign_directory(root)
        staging = root.parent / f".{root.name}.building-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            if progress:
                print(f"tiny kit: building into {root} (first use; about a minute or two on one core)")
            metrics = build_kit(staging, recipe, progress=progress, final_root=root)
            stamp = {
                "version": KIT_VERSION,
                "recipe_hash": recipe_hash(recipe),
                "recipe": asdict(recipe),
                "torch_version": torch.__version__,
                "metrics": metrics,
                "files": _file_sizes(staging),
            }
            (staging / STAMP_NAME).write_text(json.dumps(stamp, indent=2) + "\n", encoding="utf-8")
            old = root.parent / f".{root.name}.old-{os.getpid()}"
            if root.exists():
                root.rename(old)
            staging.rename(root)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    if progress:
        print(f"tiny kit: ready in {metrics['timings']['total_s']:.0f} s at {root}")
    return TinyKitPaths.under(root, metrics)


def quick_recipe(**changes) -> KitRecipe:
    """QUICK_RECIPE with some fields changed (tests, benchmarks)."""
    return replace(QUICK_RECIPE, **changes)
