# A stand-in for sd-scripts' library/train_util.py with the same code shape around what install_kohya patches
# (get_optimizer's fallback to a custom optimizer, get_scheduler_fix's SchedulerType lookup). Written for the tests.
import ast
import importlib
import logging

import torch

logger = logging.getLogger(__name__)
TYPE_TO_SCHEDULER_FUNCTION = {"constant": lambda optimizer, **kw: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)}


class SchedulerType(str):
    def __new__(cls, value):
        if value not in TYPE_TO_SCHEDULER_FUNCTION:
            raise ValueError(f"{value} is not a valid SchedulerType")
        return str.__new__(cls, value)


def get_optimizer(args, trainable_params):
    optimizer_type = (args.optimizer_type or "AdamW").lower()
    optimizer_kwargs = {}
    for arg in args.optimizer_args or []:
        key, value = arg.split("=")
        optimizer_kwargs[key] = ast.literal_eval(value)
    lr = args.learning_rate
    optimizer = None
    optimizer_class = None

    if optimizer_type == "AdamW".lower():
        optimizer_class = torch.optim.AdamW
        optimizer = optimizer_class(trainable_params, lr=lr, **optimizer_kwargs)

    if optimizer is None:
        # 任意のoptimizerを使う
        case_sensitive_optimizer_type = args.optimizer_type  # not lower
        if "." not in case_sensitive_optimizer_type:
            optimizer_module = torch.optim
        else:
            values = case_sensitive_optimizer_type.split(".")
            optimizer_module = importlib.import_module(".".join(values[:-1]))
            case_sensitive_optimizer_type = values[-1]
        optimizer_class = getattr(optimizer_module, case_sensitive_optimizer_type)
        optimizer = optimizer_class(trainable_params, lr=lr, **optimizer_kwargs)
    return "name", "args", optimizer


def get_scheduler_fix(args, optimizer, num_processes):
    name = args.lr_scheduler
    num_training_steps = args.max_train_steps * num_processes
    num_warmup_steps = args.lr_warmup_steps
    num_cycles = args.lr_scheduler_num_cycles
    min_lr_ratio = args.lr_scheduler_min_lr_ratio
    lr_scheduler_kwargs = {}
    for arg in args.lr_scheduler_args or []:
        key, value = arg.split("=")
        lr_scheduler_kwargs[key] = ast.literal_eval(value)

    name = SchedulerType(name)
    schedule_func = TYPE_TO_SCHEDULER_FUNCTION[name]
    return schedule_func(optimizer, num_warmup_steps=num_warmup_steps, num_training_steps=num_training_steps,
                         num_cycles=num_cycles)
