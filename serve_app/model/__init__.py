"""The model replicas: the SDXL-Turbo pipeline, its backends and CPU speed levers. The only
package that imports torch and diffusers."""
