"""The real diffusers pipeline (tiny model) reports each denoising step to its caller."""


from serve_app.config import AppConfig
from serve_app.model.pipeline import load_generator
from serve_app.protocol import GenerationItem


def test_on_step_is_called_once_per_denoising_step(tmp_path):
    config = AppConfig.model_validate(
        {"model": {"cache_dir": str(tmp_path), "warmup_sizes": []}, "replica": {"num_cpus": 1}})
    generator = load_generator(config)
    steps = []
    [[image]] = generator.generate([GenerationItem("steps", 512, 512, 3, seed=1)],
                                   on_step=steps.append)
    assert steps == [1, 2, 3]
    assert image.shape == (512, 512, 3)
    [[same]] = generator.generate([GenerationItem("steps", 512, 512, 3, seed=1)])
    assert (same == image).all()
