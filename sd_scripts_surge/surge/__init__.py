"""The surge engine (DESIGN §3): units, capture, flavors, probes, anchors, controller, replay, losses, teachers,
distill. Pure of the trainer: nothing here reads the training config."""
