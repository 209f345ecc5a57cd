"""The local gradio app (`sd-surge-gui`, `python -m sd_scripts_surge.gui`)."""
