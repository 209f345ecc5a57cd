# A stand-in for kohya_ss' kohya_gui/class_basic_training.py: the same dropdown and args-box code shape
# (hard-coded choices lists, gr.Dropdown / gr.Textbox keyword arguments). Written for the tests.
import gradio as gr


class BasicTraining:
    def init_lr_and_optimizer_controls(self) -> None:
        with gr.Row():
            self.lr_scheduler = gr.Dropdown(
                label="LR Scheduler",
                choices=[
                    "adafactor",
                    "constant",
                    "constant_with_warmup",
                    "cosine",
                    "cosine_with_restarts",
                ],
                value="cosine",
            )
            self.optimizer = gr.Dropdown(
                label="Optimizer",
                choices=[
                    "AdamW",
                    "AdamW8bit",
                    "Adafactor",
                    "Lion",
                ],
                value="AdamW8bit",
                allow_custom_value=True,
            )

    def init_grad_and_lr_controls(self) -> None:
        with gr.Row():
            self.lr_scheduler_args = gr.Textbox(
                label="LR scheduler extra arguments",
                lines=2,
                placeholder="(Optional) eg: milestones=[1,10,30,50] gamma=0.1",
                value="",
            )
            self.optimizer_args = gr.Textbox(
                label="Optimizer extra arguments",
                lines=2,
                placeholder="(Optional) eg: relative_step=True scale_parameter=True warmup_init=True",
                value="",
            )
