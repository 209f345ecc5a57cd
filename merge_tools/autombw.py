"""`sd-merge autombw RECIPE --reference REF -o best.toml`: Bayesian search of MBW block weights.

The search (optuna's TPE sampler) sets the block weights of one block-weighted parameter of a recipe
node (by default the final node's MBW parameter, e.g. weighted_pair's α or TIES' λ), merges the recipe with
the merge engine for every trial, and scores the result with a reward:
- built in, `probes`: agreement with a reference model on fixed probes — the UNet's noise prediction on
  seeded latents, timesteps and conditioning, as −(relative MSE to the reference's prediction). It runs on
  the CPU and needs no data, text encoders or images.
- `--clip-model DIR --prompts FILE`: the CLIP score of images the merged checkpoint renders for the prompts,
  with a CLIP model you have locally (`ClipScoreReward`);
- `--reward-fn module:function`: your own scorer, called as function(checkpoint_path) → float (higher is
  better), e.g. one that renders images and runs an aesthetic or preference model you have installed.
The study lives in SQLite (`--study`, default beside the output), so a crashed or stopped search resumes
where it was: finished trials count toward `--trials`. The best weights are written as a TOML recipe
(the input recipe with the searched parameter set to a {block = weight} table), and `--plots DIR` draws
the objective over trials and the importance of each block weight (optuna's fANOVA).
"""

from __future__ import annotations

import copy
import importlib
import math
import os
import tempfile
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import toml
import torch
from tqdm import tqdm

from merge_tools.engine import MergeOptions, plan_merge, run_merge
from merge_tools.io import TensorReader
from merge_tools.recipe import RecipeError, load_recipe, parse_recipe
from sd_scripts_surge.models.keymap import Architecture, detect_architecture


def block_groups(arch: Architecture, mode: str) -> dict[str, list[str]]:
    """Search dimensions → the blocks each sets. mode "blocks": one per block; "coarse": BASE, IN*, M*, OUT*."""
    if mode == "blocks":
        return {b: [b] for b in arch.blocks}
    if mode == "coarse":
        out: dict[str, list[str]] = {}
        for b in arch.blocks:
            head = "BASE" if b == "BASE" else b.rstrip("0123456789")
            out.setdefault(head, []).append(b)
        return out
    raise ValueError(f"--groups must be blocks or coarse, not {mode!r}")


# ------------------------------------------------------------------------------------------- rewards


def _unet_inputs(config: dict[str, Any], n: int, seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    size = 8
    latents = torch.randn(n, config["in_channels"], size, size, generator=g)
    timesteps = torch.linspace(50, 950, n).round().long()
    context = torch.randn(n, 8, config["cross_attention_dim"], generator=g)
    inputs: dict[str, Any] = {"sample": latents, "timestep": timesteps, "encoder_hidden_states": context}
    if config.get("addition_embed_type") == "text_time":
        time_dim = config["addition_time_embed_dim"]
        text_dim = config["projection_class_embeddings_input_dim"] - 6 * time_dim
        inputs["added_cond_kwargs"] = {"text_embeds": torch.randn(n, text_dim, generator=g),
                                       "time_ids": torch.randn(n, 6, generator=g)}
    return inputs


def load_unet(path: str | os.PathLike) -> torch.nn.Module:
    """Only the UNet of a single-file checkpoint (what the probe reward runs), built from the config the
    file carries (`surge.unet_config`) or inferred from its shapes."""
    import json

    from diffusers import UNet2DConditionModel
    from safetensors import safe_open

    from sd_scripts_surge.models.configs import infer_unet_config
    from sd_scripts_surge.models.convert import UNET_PREFIX, convert_unet_from_ldm
    from sd_scripts_surge.models.io import CONFIG_METADATA_KEYS, detect_arch

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        keys = list(f.keys())  # noqa: SIM118 - safe_open has keys(), not iteration
        ldm = {k[len(UNET_PREFIX) :]: f.get_tensor(k) for k in keys if k.startswith(UNET_PREFIX)}
    if CONFIG_METADATA_KEYS["unet"] in meta:
        config = json.loads(meta[CONFIG_METADATA_KEYS["unet"]])
    else:
        config = infer_unet_config({k: tuple(v.shape) for k, v in ldm.items()}, detect_arch(keys))
    unet = UNet2DConditionModel(**config)
    unet.load_state_dict(convert_unet_from_ldm(ldm, dict(unet.config)))
    return unet.eval()


class ProbeReward:
    """−relative MSE of the UNet's noise prediction against the reference's, on seeded probe inputs."""

    def __init__(self, reference: str | os.PathLike, probes: int = 4, seed: int = 0):
        unet = load_unet(reference)
        self.inputs = _unet_inputs(dict(unet.config), probes, seed)
        self.target = self._predict(unet)

    @torch.no_grad()
    def _predict(self, unet: torch.nn.Module) -> torch.Tensor:
        return unet(**self.inputs).sample.double()

    def __call__(self, checkpoint: Path) -> float:
        unet = load_unet(checkpoint)
        err = (self._predict(unet) - self.target).square().mean() / self.target.square().mean().clamp(min=1e-30)
        return -float(err)


class ClipScoreReward:
    """CLIP score of images the checkpoint renders: mean cosine similarity × 100 between each prompt's CLIP text
    embedding and the CLIP image embedding of what the checkpoint draws for it (Hessel et al. 2021's CLIPScore
    without its clamp at 0, so a search sees a slope everywhere), with the
    CLIP model you have (a transformers CLIP folder: config.json, weights, tokenizer, preprocessor_config.json;
    e.g. openai/clip-vit-large-patch14 downloaded once). Nothing is fetched: a missing or incomplete folder is a
    clear error. Rendering: the checkpoint's own text encoders and VAE, Euler, fixed seeds (the same noise for
    every trial, so trials differ only by their weights); SDXL and SD1 single files or diffusers folders
    (single files need `tokenizer_dir`: a folder with tokenizer/ [tokenizer_2/])."""

    def __init__(self, clip_dir: str | os.PathLike, prompts: Sequence[str], *,
                 tokenizer_dir: str | os.PathLike | None = None, steps: int = 20, size: int = 512,
                 guidance_scale: float = 5.0, seed: int = 0):
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

        clip_dir = Path(clip_dir)
        if not (clip_dir / "config.json").is_file():
            raise ValueError(f"--clip-model {clip_dir}: not a transformers CLIP folder (no config.json)")
        if not prompts:
            raise ValueError("the CLIP reward needs at least one prompt (--prompts FILE, one per line)")
        if size % 8 or size < 8 or steps < 1:
            raise ValueError(f"render size must be a positive multiple of 8 and steps ≥ 1 (got {size}, {steps})")
        try:
            self.clip = CLIPModel.from_pretrained(str(clip_dir), local_files_only=True).eval()
            self.processor = CLIPImageProcessor.from_pretrained(str(clip_dir), local_files_only=True)
            tokenizer = CLIPTokenizer.from_pretrained(str(clip_dir), local_files_only=True)
        except (OSError, ValueError) as e:
            raise ValueError(f"--clip-model {clip_dir}: {e}") from e
        self.prompts = list(prompts)
        self.tokenizer_dir = tokenizer_dir
        self.steps, self.size, self.guidance_scale, self.seed = steps, size, guidance_scale, seed
        with torch.no_grad():
            ids = tokenizer(self.prompts, padding="max_length", truncation=True, return_tensors="pt",
                            max_length=int(getattr(tokenizer, "model_max_length", 77)))
            text = self.clip.get_text_features(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"])
        self.text = torch.nn.functional.normalize(_features(text).float(), dim=-1)

    def render(self, checkpoint: str | os.PathLike) -> list[Any]:
        """The checkpoint's images for the prompts (PIL), one per prompt, at the reward's fixed seed."""
        from sd_scripts_surge.models.io import load_model
        from sd_scripts_surge.models.text import encode_prompts_sdxl, tokenize
        from sd_scripts_surge.training.sampling import decode_to_images, generate_latents

        bundle = load_model(checkpoint, tokenizer_dir=self.tokenizer_dir)
        if bundle.tokenizer_1 is None or (bundle.arch == "sdxl" and bundle.tokenizer_2 is None):
            raise ValueError(f"{checkpoint}: no tokenizers to encode the prompts (give the tokenizer folder)")
        for m in bundle.modules().values():
            m.eval()

        def encode(captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
            if bundle.arch == "sdxl":
                return encode_prompts_sdxl(captions, (bundle.tokenizer_1, bundle.tokenizer_2),
                                           (bundle.text_encoder_1, bundle.text_encoder_2))
            with torch.no_grad():
                return bundle.text_encoder_1(tokenize(bundle.tokenizer_1, captions)).last_hidden_state, None

        prediction = "v_prediction" if bundle.metadata.get("modelspec.prediction_type") == "v" else "epsilon"
        images = []
        for i, prompt in enumerate(self.prompts):  # one at a time: a 1024 px SDXL batch would not fit
            latents = generate_latents(bundle.unet, encode, [prompt], height=self.size, width=self.size,
                                       steps=self.steps, guidance_scale=self.guidance_scale, seed=self.seed + i,
                                       prediction_type=prediction)
            images += decode_to_images(bundle.vae, latents)
        return images

    @torch.no_grad()
    def score_images(self, images: Sequence[Any]) -> float:
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
        emb = torch.nn.functional.normalize(_features(self.clip.get_image_features(pixel_values=pixels)).float(),
                                            dim=-1)
        return float(100 * (emb * self.text).sum(dim=-1).mean())

    def __call__(self, checkpoint: Path) -> float:
        return self.score_images(self.render(checkpoint))


def _features(out: Any) -> torch.Tensor:
    """transformers returns the projected features as a tensor (or, in newer versions, an output object)."""
    return out if torch.is_tensor(out) else getattr(out, "pooler_output", out[0])


def load_reward_fn(spec: str) -> Callable[[Path], float]:
    """`module:function` (module importable from the current directory or sys.path)."""
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"--reward-fn must be module:function, not {spec!r}")
    import sys

    sys.path.insert(0, os.getcwd())
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"--reward-fn {spec}: {e}") from e
    if not callable(fn):
        raise ValueError(f"--reward-fn {spec} is not callable")
    return fn


# -------------------------------------------------------------------------------------------- search


@dataclass
class SearchResult:
    best_value: float
    best_weights: dict[str, float]  # block → weight
    trials: int
    recipe_path: Path


def _target(data: dict[str, Any], node: str | None) -> tuple[str, dict[str, Any]]:
    nodes = data.get("nodes") or {}
    if node is None:
        used = {x for t in nodes.values() for x in t.get("inputs", []) if isinstance(x, str)}
        roots = [n for n in nodes if n not in used]
        node = (data.get("output") or {}).get("node") or (roots[0] if len(roots) == 1 else None)
    if node is None or node not in nodes:
        raise RecipeError(f"autombw: name the node to search with --node (nodes: {', '.join(nodes)})")
    return node, nodes[node]


def autombw(
    recipe_path: str | os.PathLike,
    output: str | os.PathLike,
    *,
    reference: str | os.PathLike | None = None,
    reward_fn: str | None = None,
    clip_model: str | os.PathLike | None = None,
    prompts: Sequence[str] = (),
    tokenizer_dir: str | os.PathLike | None = None,
    render_steps: int = 20,
    render_size: int = 512,
    trials: int = 50,
    node: str | None = None,
    param: str | None = None,
    groups: str = "blocks",
    low: float = 0.0,
    high: float = 1.0,
    study_path: str | os.PathLike | None = None,
    seed: int = 0,
    probes: int = 4,
    plots: str | os.PathLike | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> SearchResult:
    import optuna

    recipe_path, output = Path(recipe_path), Path(output)
    data = tomllib.loads(recipe_path.read_text(encoding="utf-8"))
    recipe = load_recipe(recipe_path)  # validates the recipe as written
    node_name, table = _target(data, node)
    from merge_tools import methods

    spec = methods.get(str(table.get("method")))
    param = param or spec.strength
    if param is None or param not in spec.params or spec.params[param].kind != "float":
        raise ValueError(f"autombw: method {spec.name} has no block-weighted parameter {param!r}")
    first = recipe.root.models()[0].path
    reader = TensorReader(first)
    arch = detect_architecture({k: v.shape for k, v in reader.header.tensors.items()})
    reader.close()
    if not arch.known:
        raise ValueError(f"autombw: {first} is not a known architecture, so it has no MBW blocks")
    dims = block_groups(arch, groups)
    given = [name for name, v in (("--reference", reference), ("--reward-fn", reward_fn),
                                  ("--clip-model", clip_model)) if v]
    if len(given) > 1:
        raise ValueError(f"autombw takes one reward, got {' and '.join(given)}")
    reward: Callable[[Path], float]
    if reward_fn:
        reward = load_reward_fn(reward_fn)
    elif clip_model:
        reward = ClipScoreReward(clip_model, prompts, tokenizer_dir=tokenizer_dir, steps=render_steps,
                                 size=render_size, seed=seed)
    elif reference:
        reward = ProbeReward(reference, probes=probes, seed=seed)
    else:
        raise ValueError("autombw needs a reward: --reference REF.safetensors (probes), --clip-model DIR with "
                         "--prompts FILE (CLIP score of rendered images), or --reward-fn module:function")

    def recipe_for(weights: dict[str, float]) -> dict[str, Any]:
        new = copy.deepcopy(data)
        new["nodes"][node_name][param] = {b: weights[d] for d, blocks in dims.items() for b in blocks}
        return new

    study_path = Path(study_path) if study_path else output.with_suffix(".study.sqlite")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=f"autombw:{recipe_path.name}:{node_name}.{param}",
        storage=f"sqlite:///{study_path.resolve()}",
        sampler=optuna.samplers.TPESampler(seed=seed, multivariate=True),
        direction="maximize",
        load_if_exists=True,
    )
    done = len([t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE])
    if done == 0:
        default = spec.params[param].default
        study.enqueue_trial({d: min(max(float(default), low), high) for d in dims})  # the recipe's default first
    log(f"autombw: {node_name}.{param} over {len(dims)} block weights in [{low}, {high}], "
        f"{done} of {trials} trials done already ({study_path})")
    opts = MergeOptions(progress=False, log=lambda s: None, output_dtype="fp32")
    work = Path(tempfile.mkdtemp(prefix="autombw-", dir=output.parent if output.parent.exists() else None))

    def objective(trial: optuna.Trial) -> float:
        weights = {d: trial.suggest_float(d, low, high) for d in dims}
        merged = work / "trial.safetensors"
        plan = plan_merge(parse_recipe(recipe_for(weights), recipe_path.parent, str(recipe_path)), merged, opts)
        try:  # no estimate step: the same plan runs every trial, its time is known after the first
            run_merge(plan)
        finally:
            plan.close()
        value = float(reward(merged))
        merged.unlink(missing_ok=True)
        if not math.isfinite(value):
            raise optuna.TrialPruned(f"reward {value}")
        return value

    bar = tqdm(total=trials, initial=min(done, trials), desc="autombw", unit="trial", disable=not progress)
    try:
        while len([t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]) < trials:
            study.optimize(objective, n_trials=1, catch=())
            bar.update(1)
            bar.set_postfix(best=f"{study.best_value:.4g}")
    finally:
        bar.close()
        for p in work.glob("*"):
            p.unlink(missing_ok=True)
        work.rmdir()
    best = {d: float(study.best_params[d]) for d in dims}
    per_block = {b: best[d] for d, blocks in dims.items() for b in blocks}
    out = recipe_for(best)
    out.setdefault("output", {})
    header = (f"# autombw: best of {len(study.trials)} trials, reward {study.best_value:.6g} "
              f"({'probes vs ' + Path(reference).name if reference else reward_fn})\n")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.partial")
    tmp.write_text(header + toml.dumps(_absolute_models(out, recipe_path.parent)), encoding="utf-8")
    os.replace(tmp, output)
    if plots:
        draw_plots(study, Path(plots), list(dims))
    log(f"autombw: best reward {study.best_value:.6g}; wrote {output}")
    return SearchResult(study.best_value, per_block, len(study.trials), output)


def _absolute_models(data: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    """Model paths made absolute, so the written recipe works from wherever it is saved."""
    models = {}
    for name, p in (data.get("models") or {}).items():
        path = Path(p).expanduser()
        models[name] = str(path if path.is_absolute() else (base_dir / path).resolve())
    return {**data, "models": models}


def draw_plots(study: Any, folder: Path, dims: Sequence[str]) -> list[Path]:
    """objective.png (reward per trial and best so far) and importance.png (fANOVA importance per weight)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna

    folder.mkdir(parents=True, exist_ok=True)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    values = [t.value for t in done]
    best = [max(values[: i + 1]) for i in range(len(values))]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(range(len(values)), values, ".", label="trial")
    ax.plot(range(len(best)), best, "-", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("reward")
    ax.legend()
    fig.tight_layout()
    paths = [folder / "objective.png"]
    fig.savefig(paths[0], dpi=100)
    plt.close(fig)
    if len(done) >= 2 and len(dims) >= 2:
        importance = optuna.importance.get_param_importances(study)
        names = [d for d in dims if d in importance]
        fig, ax = plt.subplots(figsize=(max(5, 0.35 * len(names)), 3.5))
        ax.bar(names, [importance[n] for n in names])
        ax.set_ylabel("importance (fANOVA)")
        ax.tick_params(axis="x", rotation=90)
        fig.tight_layout()
        paths.append(folder / "importance.png")
        fig.savefig(paths[1], dpi=100)
        plt.close(fig)
    return paths
