"""model.backend openvino: the pipeline's networks as OpenVINO IR.

* cache.py: the cache key (model, versions, options) and directory, its writability.
* export.py: the export (one network at a time), `sdxl-turbo-export`, the replica's
  export subprocess.
* runtime.py: the compiled IR behind diffusers' SDXL pipeline (its scheduler and loop).

Importing this package imports neither openvino nor torch.
"""
