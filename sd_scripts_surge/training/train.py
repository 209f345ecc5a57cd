"""Surge training for SDXL: `accelerate launch train_surge_sdxl.py --config_file cfg.toml`.

Read top to bottom, this file is the algorithm (DESIGN §3):
  set up (models, teacher, data, unit map, optimizer with one param group per unit, controller)
  → teacher flavors on the probes (cached on disk, built once)
  → every epoch: student capture → anchors/zones → controller update → unit replay
  → batches: loss = task + output KD + trajectory, per-unit LRs, optimizer step
  → save checkpoints/state, samples, report.
With `--surge false` the same loop is a plain kohya-style fine-tune (task loss, no teacher).
The pieces live in their own modules of `sd_scripts_surge.training` and `sd_scripts_surge.surge`.
"""

from __future__ import annotations

import math
import signal
import sys
import time
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import DistributedType, ProjectConfiguration, broadcast, set_seed
from tqdm import tqdm

from sd_scripts_surge.config import ConfigError, TrainConfig, flag_notes, parse_train_args
from sd_scripts_surge.data import DataError
from sd_scripts_surge.data.dataset import load_datasets
from sd_scripts_surge.models.fileio import parse_size
from sd_scripts_surge.surge.distill import noise_batch, noised_batch, surge_epoch_update
from sd_scripts_surge.surge.losses import prior_loss_weights
from sd_scripts_surge.surge.units import build_unit_map
from sd_scripts_surge.training import (
    checkpoints,
    evaluation,
    inputs,
    optimization,
    samples,
    surge_setup,
    trainables,
)
from sd_scripts_surge.training.estimate import MemoryPlan, estimate
from sd_scripts_surge.training.memory_trace import MemoryTrace
from sd_scripts_surge.training.report import EpochRecord, write_report
from sd_scripts_surge.training.state import PROGRESS_MARKER, TrainProgress, find_resume_dir


def main(argv: list[str] | None = None) -> None:
    """The console entry: a configuration error is one line on stderr and exit status 2, not a traceback."""
    try:
        cfg = parse_train_args(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        train(cfg)
    except (ConfigError, DataError) as e:  # raised while setting up (dataset TOML, cached-teacher rules, …)
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def train(cfg: TrainConfig) -> Path:
    """Run a training job; returns the path of the final model (checkpoint or LoRA file)."""
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=cfg.mixed_precision,
        log_with=cfg.log_with,
        project_config=ProjectConfiguration(project_dir=cfg.output_dir, logging_dir=tracker_logging_dir(cfg)),
    )
    log = accelerator.print
    trace = MemoryTrace(accelerator.device)
    check_backend(cfg, accelerator.distributed_type, accelerator.state)
    if cfg.log_with:  # tensorboard event files / a wandb run, as sd-scripts' --log_with gives
        accelerator.init_trackers("surge_train", config=tracker_config(cfg))
    for note in flag_notes(cfg):
        log(note)
    set_seed(cfg.seed)
    output_dir = Path(cfg.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)

    # ----- set up
    with accelerator.main_process_first():  # the tiny kit and latent caches are built once
        sources = inputs.resolve_sources(cfg, log)
        plan = memory_plan(cfg, sources, log)
        if cfg.estimate:
            accelerator.end_training()
            return Path(sources.student)
        trace.mark("start, estimate")
        student = inputs.load_student(cfg, sources)
        trace.mark("load student")
        data = inputs.build_data(cfg, sources, student, accelerator, log)
        trace.mark("dataset, latent/text caches")
    trainable = trainables.make_trainable(cfg, student, log)
    unit_map = build_unit_map(student.unet, cfg.surge.unit_map)
    groups = trainables.param_groups(cfg, trainable, unit_map)
    steps_per_epoch = math.ceil(len(data.sampler.rank_batches()) / cfg.gradient_accumulation_steps)
    total_steps = trainables.total_steps(cfg, steps_per_epoch)
    optimizer = optimization.build_optimizer(cfg, groups)
    scheduler = optimization.build_scheduler(cfg, optimizer, total_steps, accelerator.num_processes)
    controller = surge_setup.build_controller(cfg.surge, unit_map)
    alphas_cumprod = surge_setup.noise_schedule(student)
    log(f"training {trainable.description}: {sum(p.numel() for g in groups for p in g['params']):,} parameters "
        f"in {len(groups)} groups; {steps_per_epoch} steps/epoch, {total_steps} optimizer steps")
    trace.mark("trainable, optimizer")

    surge = None
    if cfg.surge.enabled:
        with accelerator.main_process_first():
            surge = surge_setup.build_surge(cfg.surge, sources, student, unit_map, data, alphas_cumprod, accelerator,
                                            log, output_dir=cfg.output_dir, learning_rate=cfg.learning_rate)
        trace.mark("teacher, flavor capture")
    loss_fn = surge_setup.build_loss(cfg.surge, unit_map, alphas_cumprod, surge, v_prediction=cfg.v_parameterization,
                                     min_snr_gamma=cfg.min_snr_gamma)
    trainables.apply_full_bf16(cfg, trainable, log)

    if trainable.network is None:
        unet, optimizer, scheduler = accelerator.prepare(student.unet, optimizer, scheduler)
    else:  # LoRA: DDP syncs the network's gradients; the (frozen) UNet is called as it is, like sd-scripts
        trainable.module, optimizer, scheduler = accelerator.prepare(trainable.module, optimizer, scheduler)
        unet = student.unet.to(accelerator.device)
    student_module = accelerator.unwrap_model(unet)
    fused = optimization.fused_backward(cfg.max_grad_norm, optimizer, accelerator) if cfg.fused_backward_pass else None
    synced = unet if trainable.network is None else trainable.module  # what DDP wraps
    progress = TrainProgress(seed=cfg.seed)
    for obj in (progress, data.sampler, controller):
        accelerator.register_for_checkpointing(obj)
    if cfg.resume:
        state_dir = find_resume_dir(cfg.resume)
        log(f"resuming from {state_dir}")
        accelerator.load_state(str(state_dir))
    trace.mark("prepare")
    samples_before = samples.sample_images(cfg, sources, student, student_module, data, "student_before",
                                         accelerator) if progress.global_step == 0 else None
    trace.mark("samples before")

    clock = {"start": time.perf_counter(), "excluded": 0.0}  # wall time of training, evaluation excluded
    targets = None  # DESIGN §3 G: the teacher answered ahead of time (built inside the clock: it is training time)
    if surge is not None and cfg.surge.teacher == "cached":
        def offload_teacher() -> None:  # not needed on the device until the final teacher samples
            if accelerator.device.type != "cpu":
                surge.teacher.to("cpu")
                log("teacher moved to CPU memory while training from cached targets")

        targets = surge_setup.build_target_cache(cfg.surge, surge, loss_fn, data, alphas_cumprod, accelerator, log,
                                                 seed=cfg.seed, noise_offset=cfg.noise_offset,
                                                 on_complete=offload_teacher)
        trace.mark("teacher target cache")
    if surge is not None and cfg.surge.eval_every_n_steps and progress.global_step == 0:
        evaluate(surge, student_module, progress, accelerator, clock)

    # Ctrl-C or SIGTERM: finish the current step, save state, stop. A second Ctrl-C aborts at once.
    stop = {"requested": False}

    def request_stop(signum, frame):  # noqa: ANN001
        if stop["requested"]:
            raise KeyboardInterrupt
        stop["requested"] = True
        log("\nstop requested: saving state after this step (press Ctrl-C again to abort without saving)")

    old_handlers = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    bar = tqdm(total=total_steps, initial=progress.global_step, desc="surge" if surge else "train",
               disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    try:
        while progress.global_step < total_steps and not stop["requested"]:
            epoch = progress.epoch
            if surge is not None and progress.surge_updated_epoch < epoch:
                trace.mark("training steps" if progress.global_step else "evaluation")
                surge_update(cfg, surge, student_module, unit_map, controller, trainable, progress, accelerator, log,
                             replay=not cfg.surge.replay_epochs or epoch < cfg.surge.replay_epochs)
                trace.mark("surge epoch update (capture, replay)")

            # ----- the batches of this epoch
            data.sampler.set_epoch(epoch)
            for batch in data.batches(skip=progress.step_in_epoch):
                with accelerator.accumulate(synced):
                    cached = None
                    if targets is None:
                        noised = noise_batch(batch.latents, batch.context, batch.added_cond, alphas_cumprod,
                                             progress.generator, cfg.noise_offset or 0.0)
                    else:  # the pre-drawn (t, ε) of these images in this epoch, and the teacher's answers
                        draw = targets.draw_of(epoch)
                        noise, timesteps = targets.noise(batch.indices, draw, batch.latents.shape[1:])
                        noised = noised_batch(batch.latents, batch.context, batch.added_cond, noise, timesteps,
                                              alphas_cumprod)
                        cached = targets.targets(batch.indices, draw, accelerator.device)
                    controller.apply(optimizer)
                    loss, terms = loss_fn(unet, student_module, surge.teacher_call if surge else None,
                                          surge.teacher_module if surge else None, noised,
                                          controller.multipliers() if surge else None,
                                          prior_loss_weights(batch.is_reg, cfg.prior_loss_weight), cached=cached)
                    if not optimization.all_finite(loss, accelerator):
                        optimization.skip_nonfinite_step(optimizer, scheduler, progress, log)
                        progress.step_in_epoch += 1
                        continue
                    if fused is not None:  # each parameter is updated inside backward, its gradient freed
                        fused.begin_fused_step()
                        accelerator.backward(loss)
                    else:
                        accelerator.backward(loss)
                        if accelerator.sync_gradients and cfg.max_grad_norm:
                            accelerator.clip_grad_norm_(trainable.parameters(), cfg.max_grad_norm)
                        optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                progress.step_in_epoch += 1
                if accelerator.sync_gradients:
                    controller.step()
                    progress.global_step += 1
                    progress.history.log_step(progress.global_step, terms)
                    if not trace.has("first optimizer step"):
                        trace.mark("first optimizer step")
                    bar.update(1)
                    bar.set_postfix({k: f"{v:.4f}" for k, v in terms.items()})
                    accelerator.log({f"loss/{k}": v for k, v in terms.items()} | optimization.lr_logs(optimizer),
                                    step=progress.global_step)
                    if surge is not None and cfg.surge.update_every_n_steps \
                            and progress.global_step % cfg.surge.update_every_n_steps == 0 \
                            and progress.step_in_epoch < len(data.sampler.rank_batches()):
                        # between epoch starts: re-measure and move the LRs, no replay (cheap: probes only)
                        surge_update(cfg, surge, student_module, unit_map, controller, trainable, progress,
                                     accelerator, log, replay=False)
                    if surge is not None and cfg.surge.eval_every_n_steps \
                            and progress.global_step % cfg.surge.eval_every_n_steps == 0:
                        error = evaluate(surge, student_module, progress, accelerator, clock)
                        if cfg.surge.target_teacher_mse and error <= cfg.surge.target_teacher_mse:
                            log(f"held-out teacher-matching MSE {error:.5f} ≤ target {cfg.surge.target_teacher_mse}"
                                f" at step {progress.global_step}: stopping")
                            total_steps = progress.global_step
                    if cfg.save_every_n_steps and progress.global_step % cfg.save_every_n_steps == 0 \
                            and progress.global_step < total_steps:
                        name = f"{cfg.output_name}-step{progress.global_step:08d}"
                        checkpoints.save_model(cfg, trainable, student, name, accelerator, progress, data.resolution)
                        if cfg.save_state:  # like sd-scripts: every saved model gets its state
                            save_state(accelerator, progress, output_dir / f"{name}-state")
                if progress.global_step >= total_steps or stop["requested"]:
                    break
            if progress.step_in_epoch >= len(data.sampler.rank_batches()):
                end_of_epoch(cfg, surge, student, student_module, trainable, data, sources, progress, accelerator,
                             total_steps, output_dir, clock, log)
    finally:
        bar.close()
        for s, handler in old_handlers.items():
            signal.signal(s, handler)

    if stop["requested"]:
        state_dir = output_dir / f"{cfg.output_name}-interrupted-state"
        save_state(accelerator, progress, state_dir)
        log(f"stopped at step {progress.global_step}; resume with --resume {state_dir}")
        accelerator.end_training()
        sys.exit(130)

    trace.mark("training steps")
    write_rank_record(output_dir, controller, trainable, progress, accelerator)
    final = checkpoints.save_model(cfg, trainable, student, cfg.output_name, accelerator, progress,
                                   data.resolution)
    if cfg.save_state:
        save_state(accelerator, progress, output_dir / f"{cfg.output_name}-state")
    trace.mark("save")
    if targets is not None and accelerator.device.type != "cpu":
        surge.teacher.to(accelerator.device)
    if accelerator.is_main_process:
        samples_after = samples.sample_images(cfg, sources, student, student_module, data, "student_after", accelerator)
        sheet = samples.final_samples(cfg, sources, surge, student, data, samples_before, samples_after, output_dir)
        page = write_report(progress.history, output_dir / "report", samples=sheet, title=f"{cfg.output_name}")
        trace.mark("samples after, report")
        log(trace.table(None if plan is None else plan.total(("device", "ram") if accelerator.device.type == "cpu"
                                                              else "device")))
        log(f"model: {final}\nreport: {page}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return final


FLAVOR_WARN_BYTES = 8 * 2**30


def check_backend(cfg: TrainConfig, backend: DistributedType, state: object = None) -> None:
    """Refuse what a sharding backend (FSDP, DeepSpeed) cannot do, before anything is loaded
    (examples/accelerate/README.md)."""
    if backend not in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return
    name = "FSDP" if backend == DistributedType.FSDP else "DeepSpeed"
    if cfg.fused_backward_pass:
        raise ConfigError(f"--fused_backward_pass cannot run under {name}: the backend owns the (sharded) gradients; "
                          "drop the flag and let it shard them")
    plugin = getattr(state, "deepspeed_plugin", None)
    shards_weights = backend == DistributedType.FSDP or getattr(plugin, "zero_stage", 0) == 3
    if cfg.surge.enabled and shards_weights and (cfg.surge.replay_units or cfg.surge.replay_mode == "all"
                                                 or cfg.surge.lerp_alpha):
        raise ConfigError(f"unit replay and unit LERP run single units alone, which needs each unit's whole weights "
                          f"on every rank; {name}{' ZeRO-3' if backend != DistributedType.FSDP else ''} holds only "
                          "a shard: set surge_replay_units = 0, surge_replay_mode = single and surge_lerp_alpha = 0, "
                          "or use DDP / ZeRO-2")


def memory_plan(cfg: TrainConfig, sources: inputs.Sources, log) -> MemoryPlan | None:  # noqa: ANN001
    """`--estimate`'s plan, printed before anything is loaded; None (with a line) when it cannot be built."""
    try:
        datasets = load_datasets(cfg, sources.dataset_config, sources.train_data_dir)
        width, height = datasets[0].resolution
        teachers = max(1, len(sources.teachers)) if cfg.surge.enabled else 0
        entries = dataset_entries(datasets) if cfg.surge.teacher == "cached" else None
        plan = estimate(cfg, sources.student, resolution=(height, width), teachers=teachers, entries=entries)
    except Exception as e:  # noqa: BLE001 - the estimate is advice; the run's own loading reports real errors
        if cfg.estimate:
            raise
        log(f"memory estimate unavailable: {e}")
        return None
    device = parse_size(cfg.estimate_device or 0)
    log("memory plan (estimate):\n" + plan.table(device))
    flavors = sum(p.bytes for p in plan.parts if p.name == "flavor cache")
    if flavors > FLAVOR_WARN_BYTES and not cfg.surge.flavor_resolution:
        log(f"note: the full-size flavor cache will take about {flavors / 2**30:.1f} GiB of disk; "
            "surge_flavor_resolution = 8 pools it (unit replay then turns off), or lower surge_probes / num_seeds")
    if device and plan.fits(device) == "does NOT fit" and not cfg.estimate:
        raise ConfigError(f"the estimated {plan.total() / 2**30:.1f} GiB (+ overhead) do not fit "
                          f"--estimate_device {cfg.estimate_device}: see the plan above (gradient checkpointing, "
                          "--fused_backward_pass, full_bf16, --surge_teacher cached, LoRA or a smaller batch)")
    return plan


def dataset_entries(datasets: list) -> int:
    """Images × repeats per epoch, counted from the folders (no image is opened)."""
    from sd_scripts_surge.data import IMAGE_EXTENSIONS

    total = 0
    for dataset in datasets:
        for subset in dataset.subsets:
            if subset.image_dir.is_dir():
                images = sum(p.suffix.lower() in IMAGE_EXTENSIONS for p in subset.image_dir.iterdir())
                total += images * subset.num_repeats
    return total


def tracker_logging_dir(cfg: TrainConfig) -> str | None:
    """sd-scripts' layout: <logging_dir>/<log_prefix><YYYYmmddHHMMSS>; logging_dir defaults to <output_dir>/logs."""
    if not cfg.log_with:
        return cfg.logging_dir
    root = Path(cfg.logging_dir) if cfg.logging_dir else Path(cfg.output_dir) / "logs"
    return str(root / f"{cfg.log_prefix or ''}{time.strftime('%Y%m%d%H%M%S')}")


def tracker_config(cfg: TrainConfig) -> dict:
    """The run's settings as flat scalars (what tensorboard's hparams and wandb's config accept)."""
    import dataclasses

    flat = {}
    for prefix, source in (("", cfg), ("surge_", cfg.surge)):
        for f in dataclasses.fields(source):
            value = getattr(source, f.name)
            if isinstance(value, bool | int | float | str):
                flat[prefix + f.name] = value
    return flat


def save_state(accelerator: Accelerator, progress: TrainProgress, directory: Path) -> None:
    """accelerate's state (model, optimizer, scheduler, RNG, registered objects) plus a marker file."""
    accelerator.save_state(str(directory))
    if accelerator.is_main_process:
        (directory / PROGRESS_MARKER).write_text(
            f'{{"global_step": {progress.global_step}, "epoch": {progress.epoch}}}\n')
    accelerator.wait_for_everyone()


def surge_update(cfg: TrainConfig, surge: surge_setup.SurgeSetup, student_module, unit_map, controller, trainable,  # noqa: ANN001
                 progress: TrainProgress, accelerator: Accelerator, log, replay: bool = True) -> None:  # noqa: ANN001
    """DESIGN §3 B–E: student capture, anchors and zones, controller, replay (at the start of an epoch, or of the
    first `replay_epochs`; without replay every `update_every_n_steps` steps)."""
    epoch = progress.epoch
    update = surge_epoch_update(
        student_module, unit_map, surge.probes, surge.store, controller,
        options=surge.capture_options, rules=surge.rules, replay_units=surge.replay_units if replay else 0,
        replay_mode=surge.replay_mode,
        lerp_teacher=surge.lerp_teacher if replay else None, lerp_alpha=cfg.surge.lerp_alpha,
        lerp_first=cfg.surge.lerp_first,
        replay_steps=cfg.surge.replay_steps, replay_lr=surge.replay_lr, replay_batch=cfg.surge.replay_batch,
        pre_change_layers=cfg.surge.pre_change_layers, post_change_layers=cfg.surge.post_change_layers,
        rank=accelerator.process_index, world_size=accelerator.num_processes,
        replay_params=trainable.unit_params, log=log,
        controller_mode="random" if cfg.surge.random_lr else "surge" if cfg.surge.controller else "off",
        random_seed=cfg.seed * 1009 + epoch * 100003 + progress.global_step,
    )
    if not replay and progress.surge_updated_epoch >= epoch:  # a between-epochs update (update_every_n_steps)
        accelerator.log({f"surge_target/{u}": v for u, v in update.targets.items()}, step=progress.global_step)
        log(f"step {progress.global_step}: per-unit LR targets updated; anchors {update.zones.anchors or '-'}")
        return
    if update.replay and accelerator.num_processes > 1:
        for p in trainable.parameters():  # replicas must stay identical after replay
            p.data.copy_(broadcast(p.data, from_process=0))
    progress.history.log_epoch(EpochRecord(
        epoch=epoch, multipliers=dict(update.targets),
        relative_difference={u: row["d"] for u, row in update.stats.items()},
        anchors=update.zones.anchors, high_difference=update.zones.high_difference,
        slow=update.zones.slow, replay=[r.as_dict() for r in update.replay]))
    progress.surge_updated_epoch = epoch
    log(f"epoch {epoch}: anchors {update.zones.anchors or '-'}; high-difference "
        f"{update.zones.high_difference or '-'}; slow {update.zones.slow or '-'}")


def end_of_epoch(cfg: TrainConfig, surge, student, student_module, trainable, data, sources,  # noqa: ANN001
                 progress: TrainProgress, accelerator: Accelerator, total_steps: int, output_dir: Path,
                 clock: dict, log) -> None:  # noqa: ANN001
    """Count the epoch, measure teacher matching, save (model + state) and sample as configured."""
    progress.epoch += 1
    progress.step_in_epoch = 0
    if surge is not None and not cfg.surge.eval_every_n_steps:
        error = evaluate(surge, student_module, progress, accelerator, clock)
        log(f"epoch {progress.epoch}: held-out teacher-matching MSE {error:.5f}")
    last = progress.global_step >= total_steps
    if cfg.save_every_n_epochs and progress.epoch % cfg.save_every_n_epochs == 0 and not last:
        name = f"{cfg.output_name}-{progress.epoch:06d}"
        checkpoints.save_model(cfg, trainable, student, name, accelerator, progress, data.resolution)
        if cfg.save_state:
            save_state(accelerator, progress, output_dir / f"{name}-state")
    if cfg.sample_every_n_epochs and progress.epoch % cfg.sample_every_n_epochs == 0 and not last:
        samples.sample_images(cfg, sources, student, student_module, data, f"e{progress.epoch:06d}", accelerator)


def evaluate(surge: surge_setup.SurgeSetup, student_module, progress: TrainProgress, accelerator: Accelerator,  # noqa: ANN001
             clock: dict) -> float:
    """Held-out teacher-matching MSE now; logged with the training wall time so far (evaluation excluded)."""
    started = time.perf_counter()
    error = evaluation.teacher_matching_error(student_module, surge, accelerator)
    seconds = started - clock["start"] - clock["excluded"]
    progress.history.eval.append({"step": progress.global_step, "teacher_mse": error, "seconds": round(seconds, 3)})
    accelerator.log({"eval/teacher_mse": error}, step=progress.global_step)
    clock["excluded"] += time.perf_counter() - started
    return error


def write_rank_record(output_dir: Path, controller, trainable, progress: TrainProgress,  # noqa: ANN001
                      accelerator: Accelerator) -> None:
    """`ranks/rank{N}.json` from every process: multipliers, step and a hash of the trained weights.

    Identical files across ranks show the replicas agree (the multi-process test reads them)."""
    import hashlib
    import json

    digest = hashlib.sha256()
    local = 0
    for p in trainable.parameters():
        # FSDP2 holds each parameter as a DTensor shard: hash the gathered whole (every rank joins each gather)
        whole = p.full_tensor() if hasattr(p, "full_tensor") else p
        local += p.to_local().numel() if hasattr(p, "to_local") else p.numel()
        digest.update(whole.detach().float().cpu().numpy().tobytes())
    record = {"rank": accelerator.process_index, "world_size": accelerator.num_processes,
              "global_step": progress.global_step, "multipliers": controller.multipliers(),
              "targets": controller.targets, "weights_sha256": digest.hexdigest(),
              "local_parameters": local, "parameters": sum(p.numel() for p in trainable.parameters())}
    folder = output_dir / "ranks"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"rank{accelerator.process_index}.json").write_text(json.dumps(record, indent=1, sort_keys=True))
    accelerator.wait_for_everyone()
