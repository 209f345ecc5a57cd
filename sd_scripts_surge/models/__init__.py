"""Model loading and saving: SAI/ldm single files and diffusers folders, SDXL and SD1."""
